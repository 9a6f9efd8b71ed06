"""Request checks, in order, on every route (answers in OpenAI's error format):

1. API key (when --api-key-env is set; required for any non-loopback bind): `Authorization: Bearer KEY` or
   `x-api-key: KEY`, compared in constant time. 401 otherwise.
2. Host (loopback binds): the Host header must name the gateway itself (localhost, 127.x, [::1], *.localhost, with or
   without its port). A DNS-rebinding page sends its own host name: 403.
3. Origin (state-changing methods: POST, PUT, PATCH, DELETE): a present Origin must be the gateway's own, a loopback
   one, or allow-listed (--allow-origin / SAGE_LLM_GATEWAY_ORIGINS); `null` counts as foreign. 403.
4. Content-Type (POST and friends): application/json only. A cross-site page can send text/plain, form-encoded or
   multipart bodies without a CORS preflight; JSON needs one, which only allow-listed origins get. 415.

CORS (`preflight`, `cors_headers`): only origins named with --allow-origin get a preflight answer (`OPTIONS` with
Access-Control-Request-Method, answered before the key check since browsers send no key on it) and an
Access-Control-Allow-Origin header on responses; every other preflight is a 403 that touches nothing.

Proxied paths (`proxy_path`): the raw request target is checked as sent and forwarded byte for byte, so what the
engine decodes is what was checked. Encoded dots, slashes, backslashes and percent signs, dot segments, empty segments
and vLLM's admin routes under /v1 are refused (400): nothing can normalise outside /v1/.
"""

from __future__ import annotations

import functools
import hmac
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from sage_llm.core.addresses import is_loopback

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PROXY_METHODS = ("GET", "POST")  # vLLM's OpenAI routes; only POST may load a model
CORS_MAX_AGE_S = 600
# /v1 routes of vLLM that change the engine itself, not answers (runtime LoRA loading, when an engine allows it)
ADMIN_V1_ROUTES = frozenset({"load_lora_adapter", "unload_lora_adapter"})
_PATH_CHARS = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/%-]*$")
_BAD_ESCAPE = re.compile(r"%(2e|2f|5c|25|[01][0-9a-f]|7f)", re.IGNORECASE)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class PathRefused(ValueError):
    """A proxied path that is not plainly under /v1/."""


def proxy_path(raw_target: str) -> str:
    """The raw path of `raw_target` (the request target as sent, query string cut off) when it is plainly a /v1/
    route: the caller forwards exactly these bytes (`yarl.URL(..., encoded=True)`). PathRefused otherwise."""
    return _checked_path(raw_target.split("?", 1)[0])


@functools.lru_cache(maxsize=256)  # a client uses a handful of routes; a refusal is not cached (it raises)
def _checked_path(raw: str) -> str:
    shown = raw if len(raw) <= 120 else raw[:117] + "..."
    if not _PATH_CHARS.match(raw) or _BAD_ESCAPE.search(raw):
        raise PathRefused(f"path {shown!r} is not allowed: no encoded dots, slashes, backslashes or percent signs")
    segments = unquote(raw).split("/")[1:]
    if segments[0] != "v1" or len(segments) < 2 or any(s in ("", ".", "..") for s in segments[1:]):
        raise PathRefused(f"path {shown!r} is not allowed: only plain /v1/... routes are proxied")
    if segments[1] in ADMIN_V1_ROUTES:
        raise PathRefused(f"path {shown!r} is not allowed: engine administration is not proxied")
    return raw


def cors_allowed(origin: str | None, allowed: list[str]) -> bool:
    """Is `origin` one the user named with --allow-origin (the only origins a browser page may read answers from)?"""
    if not origin or not allowed:
        return False
    return origin.strip().rstrip("/") in {a.rstrip("/") for a in allowed}


def is_preflight(method: str, headers: Any) -> bool:
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


def preflight(headers: Any, allowed: list[str]) -> tuple[int, dict[str, str], str | None]:
    """(status, headers, refusal) for a CORS preflight: 204 with the Access-Control-* headers for an allow-listed
    origin asking for GET or POST, else 403 and why."""
    origin = headers.get("Origin", "")
    if not cors_allowed(origin, allowed):
        return 403, {}, f"Origin {origin!r} may not use this gateway (add it with --allow-origin)"
    method = headers.get("Access-Control-Request-Method", "").strip().upper()
    if method not in PROXY_METHODS:
        return 403, {}, f"method {method!r} is not allowed cross-origin (GET and POST are)"
    asked = [h.strip() for h in headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
    if not all(_TOKEN.match(h) for h in asked):
        return 403, {}, "malformed Access-Control-Request-Headers"
    out = {**cors_headers(origin), "Access-Control-Allow-Methods": ", ".join(PROXY_METHODS),
           "Access-Control-Max-Age": str(CORS_MAX_AGE_S)}
    if asked:
        out["Access-Control-Allow-Headers"] = ", ".join(asked)
    return 204, out, None


def cors_headers(origin: str) -> dict[str, str]:
    """The headers that let an allow-listed origin's page read a response."""
    return {"Access-Control-Allow-Origin": origin.strip(), "Vary": "Origin",
            "Access-Control-Expose-Headers": "Retry-After, x-sage-llm-source, x-sage-llm-engine"}


def _host_only(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def host_ok(host_header: str | None, bind_host: str) -> bool:
    if not host_header:
        return False  # HTTP/1.1 requires it; an empty Host is not ours (ollama#17721)
    host = _host_only(host_header)
    return is_loopback(host) or host == _host_only(bind_host)


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
    return is_loopback(parts.hostname.lower()) or parts.hostname.lower() == _host_only(bind_host)


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
