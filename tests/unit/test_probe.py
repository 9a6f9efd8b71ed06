"""The status probe on plain sockets: a correct Host header for IPv6, and a deadline that covers the name lookup."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from sage_llm.observe import probe as probes


class RecordingServer:
    """A real HTTP server on a socket of `family`: records each request's head and answers /health with 200."""

    def __init__(self, host: str, family: int) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                self.heads.append(buf)
                body = b'{"object": "list", "data": []}' if buf.startswith(b"GET /v1/models") else b""
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.sock.close()


def host_headers(server: RecordingServer) -> list[str]:
    return [line.split(":", 1)[1].strip() for head in server.heads for line in head.decode().split("\r\n")
            if line.lower().startswith("host:")]


def test_ipv6_host_header_is_bracketed():
    server = RecordingServer("::1", socket.AF_INET6)
    try:
        result = probes.probe("::1", server.port, timeout=5.0)
        bracketed = probes.probe("[::1]", server.port, timeout=5.0)
    finally:
        server.close()
    assert (result.health, result.models_status, result.error) == (200, 200, None)
    assert bracketed.health == 200
    assert host_headers(server) == [f"[::1]:{server.port}"] * 4


def test_ipv4_host_header_is_unchanged():
    server = RecordingServer("127.0.0.1", socket.AF_INET)
    try:
        result = probes.probe("127.0.0.1", server.port, timeout=5.0, want_models=False)
    finally:
        server.close()
    assert result.health == 200
    assert host_headers(server) == [f"127.0.0.1:{server.port}"]


def test_a_slow_resolver_cannot_push_the_probe_past_its_deadline(monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []
    release = threading.Event()

    def slow_getaddrinfo(host, *args, **kwargs):
        calls.append(host)
        release.wait(30)  # a resolver that hangs (no DNS server answers)
        raise socket.gaierror("slow resolver gave up")

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    budget = 0.3
    started = time.monotonic()
    try:
        result = probes.probe("engine.example.invalid", 8001, timeout=budget)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert calls == ["engine.example.invalid"]  # the name went through the (patched) resolver, under the deadline
    assert result.error == f"could not resolve engine.example.invalid within {budget:g} s"
    assert not result.reachable
    # the probe ends at its budget, not when the resolver gives up (30 s): a wide margin that no slow CPU reaches
    assert elapsed < budget + 5.0


def test_a_name_that_resolves_is_probed(monkeypatch: pytest.MonkeyPatch):
    server = RecordingServer("127.0.0.1", socket.AF_INET)
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1" if host == "engine.test"
                                                                          else host, *a, **k))
    try:
        result = probes.probe("engine.test", server.port, timeout=5.0, want_models=False)
    finally:
        server.close()
    assert result.health == 200
    assert host_headers(server) == [f"engine.test:{server.port}"]


def test_one_chunked_decoder_whole_or_fed_piece_by_piece():
    """probe.split_chunks is the package's only chunked-body decoder: the probes decode whole bodies with it, the load
    generator feeds it whatever each read brought; both must give the same payloads."""
    from sage_llm.observe.probe import _dechunk, split_chunks

    payloads = [b"data: {\"a\": 1}\n\n", b"x" * 300, b"data: [DONE]\n\n"]
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in payloads) + b"0\r\n\r\n"
    assert _dechunk(body) == b"".join(payloads)
    got: list[bytes] = []
    buf, finished = b"", False
    for i in range(len(body)):  # one byte at a time: every cut point
        buf += body[i:i + 1]
        parts, pos, finished = split_chunks(buf)
        got += parts
        buf = buf[pos:]
    assert finished
    assert got == payloads
    assert buf == b""
