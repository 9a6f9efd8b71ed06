"""sage_llm.api used in-process, as a Studio backend or the gateway would: typed requests, the CLI's rules, no CLI
libraries imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sage_llm import api
from sage_llm.core.errors import EngineNotFound, UsageError
from tests.conftest import free_port

LEAN_FORBIDDEN = ("typer", "rich", "httpx", "psutil", "pynvml", "click", "huggingface_hub", "aiohttp", "ray")


def _imported_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print(json.dumps([m for m in {LEAN_FORBIDDEN!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json\n" + probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "from sage_llm import api; api.status()",
    "from sage_llm.cli.main import run; run(['status', '--json'], 'sage-llm')",
    "from sage_llm.cli.main import run; run(['status', 'x', '--json'], 'sage-llm')",
])
def test_the_status_path_stays_lean(code, home):
    """Studio polls status: no Typer, Rich, httpx, psutil or pynvml on that path (the test hides the GPU driver)."""
    assert _imported_after(code) == []


def test_importing_the_api_imports_no_cli_library():
    assert _imported_after("import sage_llm.api") == []


def test_resolve_launch_precedence_explicit_env_dotenv_config_default(monkeypatch, tmp_path):
    config = tmp_path / "config" / "llm.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('default_model = "org/from-config"\nlocal_engine_port = 8100\ngpu_util = 0.5\n'
                      'start_timeout = 33\n')
    dotenv = tmp_path / "dot.env"
    dotenv.write_text("SAGE_LOCAL_ENGINE_PORT=8200\n")
    monkeypatch.setenv("SAGE_LLM_DOTENV", str(dotenv))
    monkeypatch.setenv("SAGE_LOCAL_ENGINE_GPU_UTIL", "0.6")
    monkeypatch.delenv("SAGE_LOCAL_ENGINE_PORT")  # the test isolation sets one
    launch = api.resolve_launch(api.LaunchRequest())
    assert launch.spec.model == "org/from-config"  # config file
    assert launch.spec.port == 8200  # .env beats the config file
    assert launch.spec.gpu_memory_utilization == 0.6  # environment beats both
    assert launch.timeout == 33.0
    assert not launch.port_explicit
    launch = api.resolve_launch(api.LaunchRequest(model="org/explicit", port=9000, gpu_memory_utilization=0.7,
                                                  timeout=5))
    assert (launch.spec.model, launch.spec.port, launch.spec.gpu_memory_utilization, launch.timeout) == (
        "org/explicit", 9000, 0.7, 5.0)
    assert launch.port_explicit


@pytest.mark.parametrize("request_", [
    api.LaunchRequest(model=""),
    api.LaunchRequest(model="org/m", gpu_memory_utilization=1.5),
    api.LaunchRequest(model="org/m", name="bad name"),
    api.LaunchRequest(model="org/m", timeout=0),
    api.LaunchRequest(model="org/m", quantization="nope"),
])
def test_bad_requests_raise_usage_error_before_anything_runs(request_, home):
    with pytest.raises(UsageError):
        api.start(request_)
    assert not (home / "engines").exists() or not any((home / "engines").iterdir())


def test_overrides_keep_only_what_was_given():
    assert api.LaunchOverrides().as_dict() == {}
    given = api.LaunchOverrides(model="org/b", max_model_len="4k", enforce_eager=False, extra_args=["--seed", "1"],
                                ray_address="").as_dict()
    assert given == {"model": "org/b", "max_model_len": "4k", "enforce_eager": False,
                     "extra_args": ["--seed", "1"], "ray_address": None}


def test_start_inspect_resolve_stop_in_process(fake_vllm, stop_all, home):
    port = free_port()
    result = api.start(api.LaunchRequest(model="org/tiny", name="inproc", port=port))
    assert result.record.base_url == f"http://127.0.0.1:{port}/v1"
    assert result.preflight is not None
    assert result.preflight.is_repo_id
    again = api.start(api.LaunchRequest(model="org/tiny", name="inproc", port=port))
    assert again.already_running
    assert again.record.pid == result.record.pid
    doc = api.status()
    assert doc["schema_version"] == 1
    managed = [e for e in doc["engines"] if e["managed"]]  # vLLMs of other users of this machine are listed too
    assert [(e["name"], e["state"]) for e in managed] == [("inproc", "ready")]
    assert not api.not_ready(api.status("inproc")["engines"])
    assert api.not_ready(api.status("nobody")["engines"])
    assert [v.name for v in api.engines(include_external=False)] == ["inproc"]
    assert api.resolve(str(port)) == "inproc"
    with pytest.raises(EngineNotFound):
        api.resolve("nobody")
    with pytest.raises(UsageError):
        api.resolve("no/such name")
    outcome = api.stop(str(port))
    assert outcome.stopped
    assert not outcome.already_gone
    assert [e for e in api.status()["engines"] if e["managed"]] == []
    assert api.find_foreground_engine(12345) is None


@pytest.mark.parametrize("request_", [
    api.LaunchRequest(model="org/m", port="8001"),  # type: ignore[arg-type]
    api.LaunchRequest(model="org/m", port=True),
    api.LaunchRequest(model="org/m", extra_args="--seed 1"),  # type: ignore[arg-type]
    api.LaunchRequest(model=["org/m"]),  # type: ignore[arg-type]
    api.LaunchRequest(model="org/m", gpu_memory_utilization="0.5"),  # type: ignore[arg-type]
    {"model": "org/m"},
    "org/m",
])
def test_wrong_types_raise_usage_error_naming_the_field(request_, home):
    with pytest.raises(UsageError) as ei:
        api.start(request_)  # type: ignore[arg-type]
    assert "must be" in ei.value.message or "expected a LaunchRequest" in ei.value.message
    assert not (home / "engines").exists() or not any((home / "engines").iterdir())


@pytest.mark.parametrize(("call", "words"), [
    (lambda: api.stop(8001.0), "NAME or PORT"),  # type: ignore[arg-type]
    (lambda: api.stop(None), "NAME or PORT"),  # type: ignore[arg-type]
    (lambda: api.stop("x", timeout="5"), "number of seconds"),  # type: ignore[arg-type]
    (lambda: api.resolve(["x"]), "NAME or PORT"),  # type: ignore[arg-type]
    (lambda: api.resolve_many("x"), "list of engine"),  # type: ignore[arg-type]
    (lambda: api.status(b"x"), "NAME or PORT"),  # type: ignore[arg-type]
    (lambda: api.restart("x", overrides={"model": "y"}), "LaunchOverrides"),  # type: ignore[arg-type]
    (lambda: api.switch("x", 5), "model must be a str"),  # type: ignore[arg-type]
    (lambda: api.start(api.LaunchRequest(model="org/m"), on_progress="print"), "must be a function"),  # type: ignore
    (lambda: api.models("/data"), "extra_dirs"),  # type: ignore[arg-type]
    (lambda: api.preflight(None), "preflight"),  # type: ignore[arg-type]
])
def test_every_call_fails_with_typed_errors(call, words, home):
    with pytest.raises(UsageError) as ei:
        call()
    assert words in ei.value.message


def test_stop_takes_an_int_port_as_documented(fake_vllm, stop_all, home):
    port = free_port()
    api.start(api.LaunchRequest(model="org/tiny", name="byport", port=port))
    assert api.resolve(port) == "byport"
    assert [e["name"] for e in api.status(port)["engines"]] == ["byport"]
    assert api.stop(port).stopped
    with pytest.raises(EngineNotFound):
        api.stop(port)


def test_a_raising_on_progress_leaves_no_engine(fake_vllm, stop_all, home, monkeypatch):
    import psutil

    from sage_llm.core.state import StateStore

    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "3")  # loading long enough for the callback to be called
    seen: list[int] = []

    class Boom(Exception):
        pass

    def on_progress(p):
        seen.append(p["record"].pid)
        raise Boom("the caller's UI broke")

    with pytest.raises(Boom):
        api.start(api.LaunchRequest(model="org/tiny", name="cb", port=free_port()), on_progress=on_progress)
    assert seen
    assert StateStore().load("cb") is None  # not recorded
    assert not psutil.pid_exists(seen[0]) or psutil.Process(seen[0]).status() == psutil.STATUS_ZOMBIE
    assert [e for e in api.status()["engines"] if e["managed"]] == []
