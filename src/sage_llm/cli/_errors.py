"""Map exceptions to one line on stderr and an exit code. Unknown errors show a traceback only with SAGE_LLM_DEBUG=1."""

from __future__ import annotations

from sage_llm.cli import _output as out
from sage_llm.core.config import debug_enabled
from sage_llm.core.errors import SageLLMError


def handle(exc: BaseException, prog: str = "sage-llm") -> int:
    if isinstance(exc, SageLLMError):
        out.error(exc.message, exc.hint)
        tail = getattr(exc, "log_tail", None)
        if tail:
            out.info("--- last log lines ---")
            for line in tail:
                out.info("  " + line[:400], raw=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        out.error("interrupted")
        return 130
    import typer  # loaded already: only the Typer path (main._run_typer) gets here
    from typer._click.exceptions import ClickException  # Typer's vendored Click (pinned <0.30): no public name

    if isinstance(exc, typer.Abort):  # Ctrl-C at a prompt
        out.error("aborted")
        return 1
    if isinstance(exc, ClickException):  # usage errors, bad values
        msg = " ".join(exc.format_message().split())
        ctx = getattr(exc, "ctx", None)
        path = getattr(ctx, "command_path", None) or prog
        out.error(msg, f"see `{path} --help`")
        return exc.exit_code or 2
    if isinstance(exc, OSError):
        out.error(f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or ''})".replace(" ()", ""))
        return 1
    if debug_enabled():
        raise exc
    out.error(f"internal error: {type(exc).__name__}: {exc}", "set SAGE_LLM_DEBUG=1 to see the traceback")
    return 1
