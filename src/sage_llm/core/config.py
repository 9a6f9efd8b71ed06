"""Environment variable names and built-in defaults, in one place."""

from __future__ import annotations

import os


class EnvVars:
    HOME = "SAGE_LLM_HOME"  # state directory override
    VLLM = "SAGE_LLM_VLLM"  # command prefix to run vLLM, split like a shell would
    DEBUG = "SAGE_LLM_DEBUG"  # show tracebacks
    LOCAL_PORT = "SAGE_LOCAL_ENGINE_PORT"
    DEFAULT_MODEL = "SAGE_LOCAL_ENGINE_DEFAULT_MODEL"
    GPU_UTIL = "SAGE_LOCAL_ENGINE_GPU_UTIL"
    CPU_KVCACHE = "VLLM_CPU_KVCACHE_SPACE"
    API_KEY_CHILD = "VLLM_API_KEY"
    ENGINE_MARK = "SAGE_LLM_ENGINE_ID"  # set in every engine's environment: identifies our processes


DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
DEFAULT_PORT = 8001
DEFAULT_GPU_UTIL = 0.9
DEFAULT_HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT = 900.0
DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_CPU_KVCACHE_GIB = "1"

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "127.0.1.1"})


def env_str(name: str, default: str | None = None) -> str | None:
    """The variable's value; for SAGE_* names unset in the environment, `./.env` then the config file (settings.py)."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        if name.startswith("SAGE_"):
            from sage_llm.core.settings import layered_env

            layered = layered_env(name)
            if layered is not None:
                return layered
        return default
    return value.strip()


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def debug_enabled() -> bool:
    return is_true(os.environ.get(EnvVars.DEBUG))
