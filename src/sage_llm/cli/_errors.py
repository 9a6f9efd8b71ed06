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
    # Click's vendored exceptions (usage errors, bad values): duck-typed, we never import click
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        msg = " ".join(str(exc.format_message()).split())
        ctx = getattr(exc, "ctx", None)
        path = getattr(ctx, "command_path", None) or prog
        if type(exc).__name__ == "Abort":
            out.error("aborted")
            return 1
        out.error(msg, f"see `{path} --help`")
        return int(getattr(exc, "exit_code", 2) or 2)
    if type(exc).__name__ == "Abort":
        out.error("aborted")
        return 1
    if isinstance(exc, OSError):
        out.error(f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or ''})".replace(" ()", ""))
        return 1
    if debug_enabled():
        raise exc
    out.error(f"internal error: {type(exc).__name__}: {exc}", "set SAGE_LLM_DEBUG=1 to see the traceback")
    return 1
