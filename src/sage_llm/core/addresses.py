"""The one rule for addresses: where to connect to a server bound to HOST, and what counts as loopback."""

from __future__ import annotations

WILDCARD_V4 = frozenset({"", "0.0.0.0", "*"})
WILDCARD_V6 = frozenset({"::", "[::]"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]", "127.0.1.1"})


def reachable_host(host: str | None) -> str:
    """The bare address to connect to for a server bound to `host`: a wildcard bind is reached on loopback."""
    if host is None or host in WILDCARD_V4:
        return "127.0.0.1"
    if host in WILDCARD_V6:
        return "::1"
    return host.strip("[]")


def url_host(host: str | None) -> str:
    """`reachable_host` as it goes into a URL or a Host header (IPv6 in brackets)."""
    bare = reachable_host(host)
    return f"[{bare}]" if ":" in bare else bare


def is_loopback(host: str | None) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1 (any spelling), localhost and *.localhost.
    A name that only starts like one (127.example.com) is not. The one definition: the engine's bind checks and the
    gateway's (bind, Host and Origin headers) use it."""
    if host is None:
        return False
    bare = host.strip("[]").lower()
    if bare in LOOPBACK_HOSTS or bare.endswith(".localhost"):
        return True
    import ipaddress  # lazy: only for addresses that are not the usual spellings

    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False
