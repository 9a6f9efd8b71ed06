"""core/addresses.is_loopback: the one loopback rule (engine binds, the gateway's bind, Host and Origin checks)."""

from __future__ import annotations

import pytest

from sage_llm.core.addresses import is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "localhost", "LOCALHOST", "app.localhost", "::1", "[::1]",
                                  "0:0:0:0:0:0:0:1"])
def test_loopback_spellings(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", [None, "", "0.0.0.0", "::", "10.0.0.1", "example.com", "127.example.com",
                                  "localhost.example.com", "128.0.0.1"])
def test_not_loopback(host: str | None) -> None:
    """A name that only begins like a loopback address is a name anyone's DNS can point anywhere."""
    assert not is_loopback(host)
