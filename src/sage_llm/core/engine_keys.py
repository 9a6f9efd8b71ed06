"""The API keys of engines a gateway started, derived the one way a restarted gateway and the user's CLI both use.

Each engine the gateway starts gets its own key, which vLLM reads from VLLM_API_KEY (never argv). Its record holds
only the key's variable name, `SAGE_LLM_GW_KEY_<hex>`; the key is an HMAC-SHA256 of that name under the gateway
secret, `gateway.key` in the user's state directory (0600 in a 0700 directory). So the gateway finds the keys of the
engines it adopts after a restart, the same user's `chat`, `bench` and `status` reach those engines, and another
local user (who cannot read the secret) or a web page cannot.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

KEY_PREFIX = "SAGE_LLM_GW_KEY_"
SECRET_FILE = "gateway.key"


def is_gateway_key(var: str | None) -> bool:
    """Does `var` (a record's api_key_env) name a key that a gateway derived?"""
    return bool(var and var.startswith(KEY_PREFIX))


def _path(root: Path | None = None) -> Path:
    from sage_llm.core import paths

    return (root or paths.home()) / SECRET_FILE


def secret(create: bool = False, root: Path | None = None) -> bytes | None:
    """The gateway secret; with `create`, made (0600) when missing. None when there is none (or it is unreadable)."""
    path = _path(root)
    with contextlib.suppress(OSError):
        data = path.read_bytes().strip()
        if len(data) >= 32:
            return data
    if not create:
        return None
    from sage_llm.core import paths

    paths.ensure_home(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        import secrets  # here, as hashlib and hmac below: `status` asks is_gateway_key of every engine, nothing more

        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    return path.read_bytes().strip()


def derive(var: str, key: bytes) -> str:
    import hashlib
    import hmac

    return hmac.new(key, var.encode(), hashlib.sha256).hexdigest()


def key_for(var: str, create: bool = False) -> str | None:
    """The key of the engine whose record names `var`; None when this user has no gateway secret."""
    key = secret(create=create)
    return derive(var, key) if key is not None else None
