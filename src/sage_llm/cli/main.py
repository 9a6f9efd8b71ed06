"""Entry points: the `sage-llm` script (`main`), `python -m sage_llm`, and `run(argv, prog)`, which SAGE's `sage` calls
through our plugin as `sage vllm` (see `sage_plugin.py`).

sage-llm installs no `sage` script: SAGE's CLI and SageMath each install one, and a second would replace theirs.

`run()` wraps the Typer app: known errors become one line on stderr and an exit code (see `_errors.py`). `prog` is the
name the user typed (`sage-llm`, `sage vllm`, `python -m sage_llm`): usage lines, help texts and hints name it. The hot
path `status` (`--json`, `-q` or the table) is served without importing Typer (cli/fast_status.py), so Studio's
polling stays cheap.
"""

from __future__ import annotations

import os
import sys

PROG = "sage-llm"
COMPLETE_VAR = "_SAGE_LLM_COMPLETE"  # Typer's shell-completion protocol for `sage-llm`


def completing() -> bool:
    """True while the shell asks for completions: then only candidates may be printed, and fast."""
    return bool(os.environ.get(COMPLETE_VAR))


def run(argv: list[str], prog: str = PROG) -> int:
    """Run the CLI with `argv` (without the program name) as program `prog`; returns the exit code."""
    from sage_llm.cli import _output

    _output.set_prog(prog)
    if completing():
        # no fast paths, no settings or state reads: straight to Typer's completion protocol
        return _run_typer(argv, prog)
    if argv == ["--version"]:  # scripts ask this often: no Typer for one line (the same line `llm.py` prints)
        from sage_llm import __version__

        sys.stdout.write(f"sage-llm {__version__}\n")
        return 0
    from sage_llm.cli.fast_status import plain_args, status

    plain = plain_args(argv)
    if plain is not None:
        try:
            return status(**plain)  # type: ignore[arg-type]
        except BaseException as exc:  # as on the Typer path: one line and an exit code (Ctrl-C: 130)
            from sage_llm.cli import _errors

            return _errors.handle(exc, prog)
    from sage_llm.cli.fast_models import is_fast, models_json

    if is_fast(argv):
        return models_json()
    return _run_typer(argv, prog)


def command(prog: str = PROG):
    """Our Click command tree (from Typer) with every help text, epilog and option help naming `prog`. Commands are
    loaded lazily (cli/llm.py's LazyGroup): each is renamed when it is first looked up."""
    import typer.main

    from sage_llm.cli._output import named
    from sage_llm.cli.llm import llm_app

    def rename(root: object) -> None:
        todo = [root]
        while todo:
            c = todo.pop()
            for attr in ("help", "epilog", "short_help"):
                text = getattr(c, attr, None)
                if isinstance(text, str):
                    setattr(c, attr, named(text, prog))
            for p in getattr(c, "params", []):
                if isinstance(getattr(p, "help", None), str):
                    p.help = named(p.help, prog)
            todo.extend(getattr(c, "commands", {}).values())

    cmd = typer.main.get_command(llm_app)  # a fresh tree on each call: renaming it changes nothing global
    rename(cmd)
    cmd.on_load = rename  # type: ignore[attr-defined]
    return cmd


def _run_typer(argv: list[str], prog: str) -> int:
    import typer
    from typer._click.exceptions import NoArgsIsHelpError  # Typer's vendored Click (pinned <0.30): no public name

    from sage_llm.cli import _errors

    cmd = command(prog)
    try:
        rv = cmd.main(args=argv, prog_name=prog, standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except typer.Exit as exc:
        return int(exc.exit_code)
    except NoArgsIsHelpError as exc:
        sys.stdout.write(exc.ctx.get_help() + "\n")  # a bare `sage-llm` (or group): the help, as --help shows it
        return 0
    except BaseException as exc:
        return _errors.handle(exc, prog)
    return rv if isinstance(rv, int) else 0


def main() -> None:
    """The `sage-llm` console script."""
    sys.exit(run(sys.argv[1:], PROG))


llm_main = main  # the entry point's former name (scripts written by older installs)
