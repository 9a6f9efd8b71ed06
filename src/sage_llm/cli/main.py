"""Entry points: `sage` (root app with the `llm` group), `sage-llm` (the `llm` group itself), `python -m sage_llm`.

`main()` wraps the Typer app: known errors become one line on stderr and an exit code (see `_errors.py`). The hot
path `status --json` is served without importing Typer or Rich at all, so Studio's polling stays cheap.
"""

from __future__ import annotations

import os
import sys

FAST_STATUS_FLAGS = {"--json"}


def _fast_status_args(args: list[str]) -> list[str] | None:
    """The args of a plain `status [NAME|PORT] --json` invocation, or None if it needs the full CLI."""
    if not args or args[0] != "status" or "--json" not in args:
        return None
    rest = [a for a in args[1:] if a != "--json"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        return None
    return rest


COMPLETE_VARS = ("_SAGE_COMPLETE", "_SAGE_LLM_COMPLETE")  # Typer's shell-completion protocol for `sage`/`sage-llm`
OWN_ROOT_OPTIONS = {"--install-completion", "--show-completion"}


def completing() -> bool:
    """True while the shell asks for completions: then only candidates may be printed, and fast."""
    return any(os.environ.get(v) for v in COMPLETE_VARS)


def run(argv: list[str], prog: str = "sage") -> int:
    """Run the CLI with `argv` (without the program name); returns the exit code."""
    if completing():
        # no fast paths, no delegation, no settings or state reads: straight to Typer's completion protocol
        return _run_typer(argv, prog)
    llm_args = argv
    if prog == "sage":
        llm_args = argv[1:] if argv and argv[0] == "llm" else None  # type: ignore[assignment]
    if llm_args is not None:
        fast = _fast_status_args(llm_args)
        if fast is not None:
            from sage_llm.cli.fast_status import status_json

            return status_json(fast[0] if fast else None)
        from sage_llm.cli.fast_models import is_fast, models_json

        if is_fast(llm_args):
            return models_json()
    if prog == "sage" and llm_args is None and not (argv and argv[0] in OWN_ROOT_OPTIONS):
        # anything but `sage llm ...` belongs to SAGE's own CLI when it is installed
        from sage_llm.cli.sage_plugin import delegate_to_sage

        code = delegate_to_sage(argv)
        if code is not None:
            return code
    return _run_typer(argv, prog)


def _run_typer(argv: list[str], prog: str) -> int:
    import typer.main

    from sage_llm.cli import _errors

    if prog == "sage":
        from sage_llm.cli.root import app
    else:
        from sage_llm.cli.llm import llm_app as app
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv, prog_name=prog.replace(" ", "-") if prog != "sage llm" else "sage llm",
                      standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except BaseException as exc:
        if type(exc).__name__ == "Exit":
            return int(getattr(exc, "exit_code", 0))
        return _errors.handle(exc, prog)
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run(sys.argv[1:], "sage"))


def llm_main() -> None:
    sys.exit(run(sys.argv[1:], "sage-llm"))
