"""sage-llm next to SAGE's CLI as published on PyPI (isage-cli 0.2.4.43, a Typer app), installed for real with pip.

No stand-in: a throw-away venv gets SAGE's own wheels and ours (built from this checkout), and the tests run the real
console scripts. The full `pip install isage-cli` pulls isagellm and torch (199 s, 6.1 GB), so the venv gets the
lightest faithful install instead, found by trying: the SAGE wheels themselves with `--no-deps` (isage-cli, plus
isage-common and isage-kernel, which `sage.cli.main`'s command groups import, plus isage-studio for the `studio`
plugin and Studio's endpoint bootstrap), and only the third-party packages their import path needs. Then
`from sage.cli.main import app` prints no "无法导入" (cannot import) warning: every SAGE command group loads,
`sage --help`, `sage status` and `sage llm --help` work. What needs the missing heavy packages (isagellm: `sage llm
serve`, `sage run chat`, ...) is not run here.

Marked `venv` (in `make test`, and `make test-sage`; it needs PyPI, which CI has): 105-160 s with a warm pip cache on
2 cores (40-60 s of it building the venv) (docs/sage-integration.md has the figures). Leave it out with `-m "not venv"`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAKE_VLLM, ROOT, free_port

pytestmark = pytest.mark.venv

SAGE_WHEELS = ["isage-cli==0.2.4.43", "isage-common==0.2.5.2", "isage-kernel==0.2.5.3", "isage-studio==0.2.4.37"]
# what `sage.cli.main` (with its groups) and Studio's endpoint bootstrap import, within both projects' pins
SAGE_DEPS = ["typer>=0.29,<0.30", "rich>=13.7,<15", "pyyaml>=6", "python-dotenv>=1.1,<2", "requests>=2.32,<3",
             "httpx>=0.28,<0.29", "colorama>=0.4.6", "tabulate>=0.9,<1", "psutil>=5.9", "packaging>=24", "click>=8",
             "cryptography>=42"]
PIP = ["-m", "pip", "--disable-pip-version-check", "-q"]
SAGE_SCRIPT_MARK = "from sage.cli.main import app"  # what pip writes into SAGE's `bin/sage`


def _pip(py: Path, *args: str, timeout: float = 600) -> None:
    res = subprocess.run([str(py), *PIP, *args], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"pip {' '.join(args)} failed:\n{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def our_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _pip(Path(sys.executable), "wheel", "--no-deps", str(ROOT), "-w", str(out))
    [wheel] = out.glob("sage_llm-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, our_wheel: Path) -> Path:
    """SAGE installed first, sage-llm second (the order of the bug report)."""
    venv = tmp_path_factory.mktemp("published") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    t0 = time.monotonic()
    _pip(py, "install", "--no-deps", *SAGE_WHEELS)
    _pip(py, "install", *SAGE_DEPS)
    _pip(py, "install", str(our_wheel))
    print(f"published SAGE venv built in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return venv


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    """The test's own state directory and HF cache (from the autouse fixture), nothing of the dev venv."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("_SAGE", "PYTHON", "VIRTUAL_ENV"))}


def _run(venv: Path, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _managed(doc: dict) -> list[dict]:
    return [e for e in doc["engines"] if e["managed"]]


def _assert_sage_works(venv: Path, env: dict[str, str]) -> str:
    """SAGE's own `sage` is SAGE's script and its commands work; returns `sage --help`."""
    assert SAGE_SCRIPT_MARK in (venv / "bin" / "sage").read_text()
    top = _run(venv, env, "sage", "--help")
    assert top.returncode == 0, top.stderr
    assert "sage-llm" not in top.stderr  # no warning of ours on every `sage` call (`llm` is taken here: said nothing)
    for name in ("status", "studio", "llm", "advanced"):
        assert f" {name} " in top.stdout, name
    assert "无法" not in top.stdout + top.stderr  # no SAGE command group failed to load ("cannot import/load")
    st = _run(venv, env, "sage", "status")
    assert st.returncode == 0, st.stderr
    assert "SAGE" in st.stdout
    assert "sage-llm" not in st.stderr
    llm = _run(venv, env, "sage", "llm", "--help")  # SAGE's own isagellm group, not ours
    assert llm.returncode == 0, llm.stderr
    assert "list-models" in llm.stdout
    assert " start " not in llm.stdout
    return top.stdout


def _assert_ours_work(venv: Path, env: dict[str, str]) -> None:
    st = _run(venv, env, "sage", "vllm", "status", "--json")
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["schema_version"] == 1
    assert _managed(doc) == []
    alone = _run(venv, env, "sage-llm", "status", "--json")
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["schema_version"] == 1


def test_sage_first_then_sage_llm(venv: Path, env: dict[str, str]) -> None:
    top = _assert_sage_works(venv, env)
    assert " vllm " in top  # our group, added by the plugin

    helped = _run(venv, env, "sage", "vllm", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: sage vllm [OPTIONS] COMMAND" in helped.stdout
    assert "sage vllm config show" in helped.stdout
    _assert_ours_work(venv, env)

    missing = _run(venv, env, "sage", "vllm", "status", "nope")
    assert missing.returncode == 3
    assert "see `sage vllm status`" in missing.stderr
    bad = _run(venv, env, "sage", "vllm", "stop", "--no-such-flag")
    assert bad.returncode == 2
    assert "no-such-flag" in bad.stderr
    assert "Traceback" not in bad.stderr

    doc = json.loads(_run(venv, env, "sage-llm", "doctor", "--json").stdout)
    [check] = [c for c in doc["checks"] if c["name"] == "sage"]
    assert check["status"] == "ok"
    assert "isage-cli 0.2.4.43" in check["message"]
    # asked of SAGE's own `sage`: `vllm` is ours, `llm` stays SAGE's (isagellm's group)
    assert "the commands are also under `vllm` there" in check["message"]
    assert "`llm` not ours: SAGE's `sage` has an `llm` command of its own" in check["message"]


def test_uninstall_keeps_sage_and_sage_llm_first_then_sage_works(venv: Path, env: dict[str, str],
                                                                 our_wheel: Path) -> None:
    py = venv / "bin" / "python"
    script = (venv / "bin" / "sage").read_bytes()
    _pip(py, "uninstall", "-y", "sage-llm")
    assert (venv / "bin" / "sage").read_bytes() == script  # SAGE's `sage` intact
    assert not (venv / "bin" / "sage-llm").exists()
    assert " vllm " not in _assert_sage_works(venv, env)
    gone = _run(venv, env, "sage", "vllm", "status")
    assert gone.returncode == 2  # Typer's "No such command"

    # the other order: sage-llm installed first, SAGE's CLI second
    _pip(py, "uninstall", "-y", "isage-cli")
    assert not (venv / "bin" / "sage").exists()
    _pip(py, "install", str(our_wheel))
    assert not (venv / "bin" / "sage").exists()  # we install no `sage`
    _pip(py, "install", "--no-deps", SAGE_WHEELS[0])
    assert " vllm " in _assert_sage_works(venv, env)
    _assert_ours_work(venv, env)


def test_todays_studio_finds_an_engine_started_under_sage(venv: Path, env: dict[str, str], stop_all: None) -> None:
    """Studio's real `bootstrap_local_llm_endpoint_from_env` (from the isage-studio wheel) finds an engine started with
    `sage vllm start` on the port named by SAGE_LLM_PORT, and chats with it the way Studio does (api key
    `local-token`). The engine is the fake vLLM here; the same probe runs against a real vLLM in
    tests/integration/test_studio_probe_real.py."""
    port = free_port()
    env = {**env, "SAGE_LLM_VLLM": f"{sys.executable} {FAKE_VLLM}", "FAKE_VLLM_LOAD_S": "0.3"}
    started = _run(venv, env, "sage", "vllm", "start", "org/Tiny-Chat", "--port", str(port))
    assert started.returncode == 0, started.stderr
    probe = (
        "import json, urllib.request\n"
        "from sage.studio.runtime.endpoints.bootstrap import bootstrap_local_llm_endpoint_from_env\n"
        "from sage.studio.runtime.endpoints.registry import get_endpoint_registry\n"
        "bootstrap_local_llm_endpoint_from_env()\n"
        "ep = get_endpoint_registry().get_endpoint('ep-local-llm-engine')\n"
        "body = json.dumps({'model': ep.model_ids[0], 'messages': [{'role': 'user', 'content': 'hi'}],"
        " 'max_tokens': 8}).encode()\n"
        "req = urllib.request.Request(ep.base_url + '/chat/completions', data=body, headers={"
        "'Content-Type': 'application/json', 'Authorization': 'Bearer local-token'})\n"
        "answer = json.loads(urllib.request.urlopen(req, timeout=30).read())\n"
        "print(json.dumps({'base_url': ep.base_url, 'models': list(ep.model_ids),"
        " 'answer': answer['choices'][0]['message']['content']}))\n")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", probe], env={**env, "SAGE_LLM_PORT": str(port)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["base_url"] == f"http://127.0.0.1:{port}/v1"
    assert found["models"] == ["org/Tiny-Chat"]
    assert found["answer"]
    stopped = _run(venv, env, "sage", "vllm", "stop", "--all")
    assert stopped.returncode == 0, stopped.stderr


def test_studio_finds_the_detached_gateways_pid(venv: Path, env: dict[str, str], tmp_path: Path) -> None:
    """`sage studio stop --stop-llm` stops the local LLM only when Studio's `StudioManager.is_llm_running` (from the
    isage-studio wheel) finds its PID: it looks for `sage-llm gateway` in the command lines of the processes. Our
    detached gateway says so. Studio probes ports 8001 and 8901; the test points it at the gateway's test port, and
    shows it only the gateway's process (other sessions' gateways may run on this machine)."""
    port = free_port()
    started = _run(venv, env, "sage-llm", "gateway", "start", "--port", str(port), "--engine-port", str(free_port()),
                   "--no-external", "--json")
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    probe = (
        "import json, psutil\n"
        "from sage.studio.config.ports import StudioPorts\n"
        "from sage.studio.application import studio_manager\n"
        f"StudioPorts.LLM_DEFAULT = StudioPorts.SAGELLM_SERVE_PORT = {port}\n"
        "every = psutil.process_iter\n"
        f"studio_manager.psutil.process_iter = lambda *a, **k: (p for p in every(*a, **k) if p.pid == {pid})\n"
        "print(json.dumps(studio_manager.StudioManager().is_llm_running()))\n")
    studio_home = tmp_path / "studio-home"
    studio_env = {**env, "HOME": str(studio_home), "XDG_CONFIG_HOME": str(studio_home / ".config"),
                  "XDG_STATE_HOME": str(studio_home / ".state"), "XDG_CACHE_HOME": str(studio_home / ".cache"),
                  "XDG_DATA_HOME": str(studio_home / ".data")}
    try:
        res = subprocess.run([str(venv / "bin" / "python"), "-c", probe], env=studio_env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.strip().splitlines()[-1]) == pid  # -1: running, but its PID not found
    finally:
        stopped = _run(venv, env, "sage-llm", "gateway", "stop")
        assert stopped.returncode == 0, stopped.stderr
