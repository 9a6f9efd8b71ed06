"""Binding beyond loopback needs keys; TLS with --tls-cert/--tls-key (issue 22). Traffic stays on 127.0.0.1: the
non-loopback rules are checked where options are resolved, and TLS is served on loopback."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from sage_llm.core.errors import UsageError
from tests.support.discipline import skip_or_fail


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made now by the openssl CLI."""
    if shutil.which("openssl") is None:
        skip_or_fail("the openssl command is needed to make a test certificate")
    crt, key = tmp_path / "gw.crt", tmp_path / "gw.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(crt), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return crt, key


def test_beyond_loopback_needs_keys_and_warns_without_tls(home: Path, cert) -> None:
    from sage_llm.gateway import keys, options

    with pytest.raises(UsageError, match="would let anyone"):
        options.resolve(host="0.0.0.0")
    keys.add("alice")
    opts = options.resolve(host="0.0.0.0")
    assert "clear text" in (opts.cleartext_warning() or "")
    tls = options.resolve(host="0.0.0.0", tls_cert=str(cert[0]), tls_key=str(cert[1]))
    assert tls.cleartext_warning() is None
    assert tls.scheme == "https"
    assert options.resolve().cleartext_warning() is None  # loopback: no warning


def test_bad_tls_options_are_one_line_exit_2(cli, home: Path, cert, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True)
    for args, needle in ((["--tls-cert", str(cert[0])], "go together"),
                         (["--tls-cert", str(cert[0]), "--tls-key", str(other)], "cannot be used"),
                         (["--tls-cert", str(tmp_path / "none.crt"), "--tls-key", str(cert[1])], "cannot be used")):
        code, _, err = cli("gateway", "run", *args)
        assert code == 2, err
        assert needle in err
        assert len(err.strip().splitlines()) == 1


def test_the_gateway_serves_https_with_a_certificate(gateway, home: Path, cert) -> None:
    from sage_llm.gateway import keys

    _, secret = keys.add("alice")
    gw = gateway(tls_cert=str(cert[0]), tls_key=str(cert[1]))
    url = f"https://127.0.0.1:{gw.gw.opts.port}"
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    with httpx.Client(base_url=url, verify=ctx, timeout=30) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200
        assert c.get("/api/gateway", headers={"Authorization": f"Bearer {secret}"}).json()["url"].startswith(
            "https://")
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not answered
        httpx.get(f"http://127.0.0.1:{gw.gw.opts.port}/health", timeout=5)
