"""Errors raised by the core. No Typer or Rich here: the CLI maps these to one line on stderr and an exit code.

Exit codes (documented in `sage-llm --help`):
  0  ok
  1  operational failure (engine failed, something survived a stop, I/O error)
  2  bad input (wrong value, unknown name, conflicting flags); nothing was changed
  3  `status NAME`: the engine exists but is not ready, or is unknown
"""

from __future__ import annotations


class SageLLMError(Exception):
    """Base error: `message` is one line naming the problem, `hint` the next thing to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(SageLLMError):
    """Bad input from the user: exit 2, nothing changed."""

    exit_code = 2


class EngineNotFound(UsageError):
    """No engine with that name or port."""


class EngineEnvMissing(SageLLMError):
    """No vLLM to run."""


class PortInUse(SageLLMError):
    """The port asked for is taken."""


class EngineFailed(SageLLMError):
    """The engine died or timed out while starting."""


class StopIncomplete(SageLLMError):
    """Something of the engine survived a stop."""


class StateError(SageLLMError):
    """The state directory cannot be used (permissions, symlink, full disk)."""


class NotReady(SageLLMError):
    """`status NAME` for an engine that is not ready."""

    exit_code = 3
