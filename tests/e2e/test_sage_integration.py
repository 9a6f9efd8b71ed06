"""`sage vllm` inside SAGE's argparse `sage` CLI (SAGE's development branch, not on PyPI: a stand-in of it).

The published Typer CLI is tested with its real wheels in test_sage_published.py. Marked `venv`: builds a throw-away
venv (no pip, ~2 s) that sees the dev environment (so our package and its `sage.cli.plugins` entry point are
installed there) plus a stand-in for SAGE's CLI: a `sage.cli.main` written like the branch's (argparse,
`parse_known_args`, the same loop over `entry_points(group="sage.cli.plugins")` that raises when a plugin raises,
dispatch through `return args._handler(args)`) and a stand-in `sage-studio` plugin. `bin/sage` is written the way pip
writes SAGE's script. Runs in about 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tests.support.discipline import skip_or_fail

pytestmark = pytest.mark.venv

STANDIN_MAIN = '''
"""Stand-in for SAGE's `sage.cli.main` (intellistream/SAGE src/sage/cli/main.py): same parser shape and plugin loop."""
from __future__ import annotations

import argparse
import os
from importlib.metadata import entry_points


def _build_parser():
    parser = argparse.ArgumentParser(prog="sage", description="SAGE stand-in")
    parser.add_argument("--trace-dir", help="Opt in to a trace spool")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("version", help="Show SAGE version information")
    sub.add_parser("status", help="Show local SAGE status summary")
    if os.environ.get("STANDIN_OWN_LLM") == "1":  # a SAGE whose `llm` is its own (the branch retired it)
        sub.add_parser("llm", help="SAGE's own llm (stand-in)")
    _load_cli_plugins(sub)
    return parser


def _load_cli_plugins(subparsers):
    for ep in sorted(entry_points(group="sage.cli.plugins"), key=lambda item: item.name):
        try:
            register_command = ep.load()
            register_command(subparsers)
        except Exception as exc:
            raise RuntimeError(f"Failed to load SAGE CLI plugin '{ep.name}' from '{ep.value}': {exc}") from exc


def main(argv=None):
    parser = _build_parser()
    args, unknown = parser.parse_known_args(list(argv) if argv is not None else None)
    if args.command is None or args.command == "status":
        print("SAGE status (stand-in)")
        return 0
    if args.command == "version":
        print("SAGE 9.9.9 (stand-in)")
        return 0
    if args.command == "llm" and not hasattr(args, "_handler"):
        print("SAGE llm (stand-in)")
        return 0
    if hasattr(args, "_handler"):
        if hasattr(args, "studio_args") and unknown:
            args.studio_args = list(args.studio_args or []) + list(unknown)
        return args._handler(args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''

STANDIN_STUDIO = '''
import argparse


def register(subparsers):
    p = subparsers.add_parser("studio", help="SAGE Studio (stand-in)")
    p.add_argument("studio_args", nargs=argparse.REMAINDER)
    p.set_defaults(_handler=lambda args: print("studio stand-in:", " ".join(args.studio_args)) or 0)
'''


def _dist_info(site: Path, name: str, entry_points: str) -> None:
    d = site / f"{name}-9.9.9.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9.9\n")
    (d / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip())
    (d / "RECORD").write_text("")


def _script(venv: Path, name: str, module: str, func: str) -> None:
    path = venv / "bin" / name
    path.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import {func}\n"
                    f"sys.exit({func}())\n")
    path.chmod(0o755)


@pytest.fixture(scope="module")
def sage_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("sage-venv") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print("
                                "sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    dev_site = sysconfig.get_paths()["purelib"]  # the dev venv: typer, ..., and sage-llm (editable, entry points)
    (site / "_dev_env.pth").write_text(f"import site; site.addsitedir({dev_site!r})\n")
    pkg = site / "sage" / "cli"
    pkg.mkdir(parents=True)
    (site / "sage" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(STANDIN_MAIN)
    (site / "sage_studio_standin.py").write_text(STANDIN_STUDIO)
    _dist_info(site, "isage", "[console_scripts]\nsage = sage.cli.main:main\n")
    _dist_info(site, "isage_studio", "[sage.cli.plugins]\nstudio = sage_studio_standin:register\n")
    _script(venv, "sage-llm", "sage_llm.cli.main", "main")
    return venv


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    # SAGE_LOCAL_ENGINE_PORT is the test's reserved port (tests/support/ports.py): nothing listens there
    return {k: v for k, v in os.environ.items() if not k.startswith(("_SAGE", "PYTHON"))}


def _managed(doc: dict) -> list[dict]:
    """Engines of our (empty) state directory; other people's vLLM processes on this machine show as external."""
    return [e for e in doc["engines"] if e["managed"]]


def _run(venv: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], env=env, capture_output=True, text=True,
                          timeout=60)


def test_sages_argparse_cli_runs_our_group_through_the_plugin(sage_venv: Path, env: dict[str, str]) -> None:
    _script(sage_venv, "sage", "sage.cli.main", "main")  # SAGE's `sage` script; sage-llm installs none

    top = _run(sage_venv, env, "sage", "--help")
    assert top.returncode == 0, top.stderr
    assert "vllm" in top.stdout
    assert "studio" in top.stdout

    st = _run(sage_venv, env, "sage", "vllm", "status", "--json")
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["schema_version"] == 1
    assert _managed(doc) == []

    # options right after `vllm` (argparse puts these in parse_known_args' unknown list) still reach our app
    helped = _run(sage_venv, env, "sage", "vllm", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: sage vllm [OPTIONS] COMMAND" in helped.stdout
    assert "start" in helped.stdout
    assert "status" in helped.stdout

    # a SAGE global option before `vllm`, and our exit codes pass through `_handler`'s return value (3: unknown)
    missing = _run(sage_venv, env, "sage", "--trace-dir", "vllm", "vllm", "status", "nope")
    assert missing.returncode == 3, (missing.stdout, missing.stderr)
    assert "nope" in missing.stderr
    assert "see `sage vllm status`" in missing.stderr

    bad = _run(sage_venv, env, "sage", "vllm", "stop", "--no-such-flag")
    assert bad.returncode == 2
    assert "no-such-flag" in bad.stderr

    assert _run(sage_venv, env, "sage", "status").stdout.strip() == "SAGE status (stand-in)"
    assert _run(sage_venv, env, "sage", "version").stdout.strip() == "SAGE 9.9.9 (stand-in)"
    assert _run(sage_venv, env, "sage", "studio", "start", "--dev").stdout.strip() == "studio stand-in: start --dev"

    alone = _run(sage_venv, env, "sage-llm", "status", "--json")
    assert alone.returncode == 0
    assert _managed(json.loads(alone.stdout)) == []


def test_our_install_has_no_sage_script(env: dict[str, str]) -> None:
    """The dev venv (sage-llm installed, no SAGE): `sage-llm` works, and there is no `sage` of ours to shadow SAGE's."""
    bindir = Path(sys.executable).parent
    if not (bindir / "sage-llm").exists():
        skip_or_fail(f"console scripts not installed in {bindir}: `make venv`")
    assert not (bindir / "sage").exists()
    st = subprocess.run([str(bindir / "sage-llm"), "status", "--json"], env=env, capture_output=True, text=True,
                        timeout=60)
    assert st.returncode == 0, st.stderr
    assert _managed(json.loads(st.stdout)) == []


def _sage_line(venv: Path, env: dict[str, str]) -> dict:
    doc = json.loads(_run(venv, env, "sage-llm", "doctor", "--json").stdout)
    [check] = [c for c in doc["checks"] if c["name"] == "sage"]
    return check


def test_where_sage_has_no_llm_sage_llm_is_ours(sage_venv: Path, env: dict[str, str]) -> None:
    """SAGE's development branch retired `sage llm`: there `sage llm ...` runs our commands, beside `sage vllm ...`."""
    _script(sage_venv, "sage", "sage.cli.main", "main")
    top = _run(sage_venv, env, "sage", "--help")
    assert "{version,status,studio,vllm,llm}" in top.stdout, top.stdout
    st = _run(sage_venv, env, "sage", "llm", "status", "--json")
    assert st.returncode == 0, st.stderr
    assert _managed(json.loads(st.stdout)) == []
    helped = _run(sage_venv, env, "sage", "llm", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: sage llm [OPTIONS] COMMAND" in helped.stdout
    missing = _run(sage_venv, env, "sage", "llm", "status", "nope")
    assert missing.returncode == 3
    assert "see `sage llm status`" in missing.stderr
    assert _run(sage_venv, env, "sage", "vllm", "status", "--json").returncode == 0
    line = _sage_line(sage_venv, env)
    assert line["status"] == "ok", line
    assert "the commands are also under `vllm` and `llm` there" in line["message"]
    assert "`llm` ours: free" in line["message"]


def test_where_sage_has_its_own_llm_nothing_of_ours_is_there(sage_venv: Path, env: dict[str, str]) -> None:
    """A SAGE whose `llm` is taken: SAGE's stays SAGE's, `sage vllm` is ours, no error and no warning on any call."""
    _script(sage_venv, "sage", "sage.cli.main", "main")
    env = {**env, "STANDIN_OWN_LLM": "1"}
    llm = _run(sage_venv, env, "sage", "llm", "status", "--json")
    assert llm.returncode == 0
    assert llm.stdout.strip() == "SAGE llm (stand-in)"
    assert llm.stderr == ""
    st = _run(sage_venv, env, "sage", "status")
    assert (st.returncode, st.stdout.strip(), st.stderr) == (0, "SAGE status (stand-in)", "")
    ours = _run(sage_venv, env, "sage", "vllm", "status", "--json")
    assert ours.returncode == 0, ours.stderr
    assert _managed(json.loads(ours.stdout)) == []
    line = _sage_line(sage_venv, env)
    assert line["status"] == "ok", line
    assert "the commands are also under `vllm` there" in line["message"]
    assert "`llm` not ours: SAGE's `sage` has an `llm` command of its own" in line["message"]
