"""Request checks, in order, on every route (answers in OpenAI's error format):

1. API key (when --api-key-env is set; required for any non-loopback bind): `Authorization: Bearer KEY` or
   `x-api-key: KEY`, compared in constant time. 401 otherwise.
2. Host (loopback binds): the Host header must name the gateway itself (localhost, 127.x, [::1], *.localhost, with or
   without its port). A DNS-rebinding page sends its own host name: 403.
3. Origin (state-changing methods: POST, PUT, PATCH, DELETE): a present Origin must be the gateway's own, a loopback
   one, or allow-listed (--allow-origin / SAGE_LLM_GATEWAY_ORIGINS); `null` counts as foreign. 403.
4. Content-Type (POST and friends): application/json only. A cross-site page can send text/plain, form-encoded or
   multipart bodies without a CORS preflight; JSON needs one, which we never grant. 415.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any
from urllib.parse import urlsplit

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_only(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_ok(host_header: str | None, bind_host: str) -> bool:
    if not host_header:
        return False  # HTTP/1.1 requires it; an empty Host is not ours (ollama#17721)
    host = _host_only(host_header)
    return _is_loopback_name(host) or host == _host_only(bind_host)


def origin_ok(origin: str | None, bind_host: str, port: int, allowed: list[str]) -> bool:
    if origin is None:
        return True  # not a browser cross-site request (curl, SDKs)
    origin = origin.strip()
    if origin.lower() == "null" or not origin:
        return False
    if origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return _is_loopback_name(parts.hostname.lower()) or parts.hostname.lower() == _host_only(bind_host)


def key_ok(headers: Any, key: str) -> bool:
    auth = headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


def check(method: str, headers: Any, bind_host: str, port: int, api_key: str | None, allowed: list[str],
          loopback: bool) -> tuple[int, str, str] | None:
    """(status, message, code) for a refused request, else None."""
    if api_key is not None and not key_ok(headers, api_key):
        return 401, "missing or wrong API key: send `Authorization: Bearer KEY`", "invalid_api_key"
    if loopback and not host_ok(headers.get("Host"), bind_host):
        return 403, f"Host {headers.get('Host')!r} is not this gateway (DNS rebinding protection)", "forbidden_host"
    if method in STATE_CHANGING:
        if not origin_ok(headers.get("Origin"), bind_host, port, allowed):
            return 403, f"Origin {headers.get('Origin')!r} may not use this gateway (add it with --allow-origin)", \
                "forbidden_origin"
        ctype = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return 415, f"Content-Type must be application/json, not {ctype or 'none'!r}", "unsupported_media_type"
    return None
