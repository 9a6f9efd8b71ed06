"""Who may call what on a shared gateway: keys (keys.py) and roles, checked once per request by the middleware.

Without keys and without --api-key-env nothing here applies (the loopback default works as before: any client, any
key, e.g. SAGE Studio's `local-token`). Once a key exists every route needs one, except `GET /health` and the
panel's static files. The --api-key-env key counts as an admin key named `api-key-env` (and, with no key file,
guards /health too, as it always did).

Roles: `user` may call /v1/* and the engine paths for the models its patterns allow, and read status, models,
events, metrics and the monitor; `admin` may also start, stop, pull, remove, and read engine logs.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
from pathlib import Path
from typing import Any

from sage_llm.core import audit
from sage_llm.gateway.keys import Key, KeyRing, shown
from sage_llm.gateway.router import GatewayError
from sage_llm.gateway.webapi import is_page_asset

ENV_KEY = Key(name="api-key-env", role="admin")
# the caller's Key for the request being handled (set by the middleware, read by the proxy; a contextvar because
# the handler runs in the middleware's task, and it needs no aiohttp version's typed request storage)
caller: contextvars.ContextVar[Key | None] = contextvars.ContextVar("sage_llm_gateway_caller", default=None)

log = logging.getLogger("sage_llm.gateway")


def presented(headers: Any) -> str:
    auth = headers.get("Authorization", "")
    return (auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")).strip()


def needed_role(method: str, path: str) -> str:
    """`admin` for what changes engines or models, or shows engine logs; `user` for the rest."""
    if path.startswith("/api/"):
        if method not in ("GET", "HEAD") or path.endswith("/logs") or path.startswith("/api/keys"):
            return "admin"
    return "user"


class Access:
    def __init__(self, api_key: str | None, required: bool = False, root: Path | None = None) -> None:
        self.api_key = api_key
        self.required = required  # a non-loopback bind: removing the last key must not open the gateway
        self.ring = KeyRing(root)

    @property
    def on(self) -> bool:
        return self.api_key is not None or self.ring.active or self.required

    def check(self, request: Any) -> tuple[int, str, str] | None:
        """(status, message, code) when refused; else None, with the caller's Key in `caller`."""
        caller.set(None)  # keep-alive requests may share a task: nothing carries over from the previous one
        audit.actor.set(None)
        self.ring.refresh()
        if not self.on:
            return None
        method, path = request.method, request.path
        keyed = self.ring.active or self.api_key is None  # /health stays guarded by a lone --api-key-env (as before)
        if is_page_asset(method, path) or (keyed and method in ("GET", "HEAD") and path == "/health"):
            return None
        given = presented(request.headers)
        if not given:
            return 401, "this gateway needs a key: send `Authorization: Bearer KEY` (or `x-api-key: KEY`)", \
                "invalid_api_key"
        key = self.ring.lookup(given)
        if key is None and self.api_key is not None and hmac.compare_digest(given.encode(), self.api_key.encode()):
            key = ENV_KEY
        if key is None:
            log.warning("gateway: refused key %s on %s %s", shown(given), method, path)
            return 401, "unknown, revoked or malformed key (ask an admin: `sage-llm gateway keys list`)", \
                "invalid_api_key"
        caller.set(key)
        audit.actor.set(key.name)  # management operations this request makes name the key in the audit log
        if needed_role(method, path) == "admin" and key.role != "admin":
            return 403, f"{method} {path} needs an admin key; key {key.name!r} has role {key.role!r}", \
                "insufficient_role"
        return None

    def allow_model(self, model: str | None) -> None:
        """GatewayError 403 when the caller's key may not use `model` (None: the gateway picks, `auto`)."""
        key = caller.get()
        if key is None:
            return
        rule = key.model_rule(model or "auto")
        if rule is not None:
            raise GatewayError(403, rule, code="model_not_allowed", param="model")

    @staticmethod
    def allows(name: str) -> bool:
        """May the caller's key use the model `name` (no key: yes)?"""
        key = caller.get()
        return key is None or key.model_rule(name) is None

    def visible(self, cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The model cards the caller's key may use (by id or an alias): a key never learns of models outside its
        patterns from /v1/models or an error's list of models (no key, or no key file: all)."""
        return [c for c in cards if any(self.allows(n) for n in [c["id"], *c.get("aliases", [])])]

    def describe(self) -> dict[str, Any]:
        """For GET /api/gateway: whether keys are required, the key file's state, and the caller's key (the panel
        shows what its role allows)."""
        you = caller.get()
        return {"required": self.on, "env_key": self.api_key is not None, **self.ring.describe(),
                "you": {"name": you.name, "role": you.role} if you is not None else None}
