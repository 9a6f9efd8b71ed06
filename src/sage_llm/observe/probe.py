"""Fast HTTP probes of vLLM's `/health` and `/v1/models`, on plain sockets (no httpx, not even http.client, on the
status path: Studio polls `status --json`, so its start-up cost matters).

Each probe has a hard time budget, and many engines are probed in parallel threads, so a hung engine costs at most
its own budget and never slows the others.
"""

from __future__ import annotations

import _socket  # the C module: `socket`'s enums and selectors cost `status` ~1 ms (docs/benchmarks.md)
import _thread
import json
import time

from sage_llm.core.records import Record, field

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any



class Probe(Record):
    host: str
    port: int
    reachable: bool = False  # a TCP connection was accepted
    refused: bool = False  # nothing listening
    health: int | None = None  # /health status code
    models: list[dict[str, Any]] = field(default_factory=list)
    models_status: int | None = None
    error: str | None = None
    elapsed_s: float = 0.0

    @property
    def model_ids(self) -> list[str]:
        return [str(m.get("id")) for m in self.models if isinstance(m, dict)]

    @property
    def owned_by_vllm(self) -> bool:
        return any(isinstance(m, dict) and m.get("owned_by") == "vllm" for m in self.models)


class _Refused(ConnectionRefusedError):
    pass


class ResolveTimeout(TimeoutError):
    """The host name did not resolve before the deadline."""


def _is_ip(host: str, family: int) -> bool:
    try:
        _socket.inet_pton(family, host)
    except OSError:
        return False
    return True


def resolve_address(host: str, port: int, family: int, deadline: float) -> Any:
    """The socket address to connect to, resolved by the absolute monotonic `deadline` (ResolveTimeout after it).

    An IP literal needs no lookup. A name is looked up in a daemon thread, because `getaddrinfo` has no timeout of its
    own (and `connect` with a name would call it outside any deadline): a slow resolver costs at most the budget."""
    if _is_ip(host, family):
        return (host, port)
    import socket  # only for host names (as threading): the engines' own addresses need no lookup
    import threading

    box: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            box.append(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4])
        except Exception as exc:  # handed to the caller
            box.append(exc)
        done.set()

    threading.Thread(target=lookup, name=f"resolve-{host}", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise ResolveTimeout(f"{host} did not resolve in time")
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def host_header(host: str, port: int) -> str:
    """`Host` header value: an IPv6 address in brackets (RFC 7230 / 3986)."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_get(host: str, port: int, path: str, deadline: float, headers: dict[str, str] | None = None,
             limit: int = 4 << 20) -> tuple[int, bytes]:
    """GET with `Connection: close`, finished (name lookup included) by the absolute monotonic `deadline`; returns
    (status, body)."""
    host = host.strip("[]")
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    address = resolve_address(host, port, family, deadline)
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        try:
            sock.connect(address)
        except ConnectionRefusedError as exc:
            raise _Refused() from exc
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header(host, port)}\r\nConnection: close\r\n{extra}"
                     "\r\n".encode())
        buf = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > limit:
                break
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                head = bytes(buf[:head_end]).lower()
                if b"content-length:" in head:
                    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0].strip() or 0)
                    if len(buf) - head_end - 4 >= length:
                        break
    finally:
        sock.close()
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        raise OSError("malformed HTTP response")
    head = bytes(buf[:head_end])
    body = bytes(buf[head_end + 4:])
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def split_chunks(buf: bytes, pos: int = 0) -> tuple[list[bytes], int, bool]:
    """The complete chunks of a chunked HTTP/1.1 body in `buf[pos:]`: (their payloads, where the first incomplete one
    starts, whether the last chunk was seen). The one chunked-body decoder of the package: the probes read whole
    bodies with it, the load generator's streaming client feeds it what each read brought."""
    parts: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return parts, pos, False
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            if len(buf) < eol + 4:  # the final CRLF (no trailers) is still on its way
                return parts, pos, False
            return parts, eol + 4, True
        end = eol + 2 + size + 2
        if len(buf) < end:
            return parts, pos, False
        parts.append(buf[eol + 2:end - 2])
        pos = end


def _dechunk(data: bytes) -> bytes:
    return b"".join(split_chunks(data)[0])


def probe(host: str, port: int, timeout: float = 0.6, api_key: str | None = None, want_models: bool = True
          ) -> Probe:
    """GET /health then /v1/models; each request gets `timeout` seconds."""
    started = time.monotonic()
    result = Probe(host, port)
    try:
        result.health, _ = http_get(host, port, "/health", time.monotonic() + timeout)
        result.reachable = True
        if want_models and result.health == 200:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
            status, body = http_get(host, port, "/v1/models", time.monotonic() + timeout, headers)
            result.models_status = status
            if status == 200:
                data = json.loads(body or b"{}")
                models = data.get("data") if isinstance(data, dict) else None
                result.models = [m for m in (models or []) if isinstance(m, dict)]
    except _Refused:
        result.refused = True
    except ResolveTimeout:
        result.error = f"could not resolve {host} within {timeout:g} s"
    except TimeoutError:
        result.reachable = True
        result.error = f"no answer from {host}:{port} within {timeout:g} s"
    except (OSError, ValueError, IndexError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.elapsed_s = time.monotonic() - started
    return result


def probe_many(targets: list[tuple[str, int, str | None]], timeout: float = 0.6) -> list[Probe]:
    """Probe (host, port, api_key) targets in parallel threads; results in the same order. Plain `_thread` threads
    (daemonic, as threading's daemon threads): `status` then skips importing threading (docs/benchmarks.md)."""
    results: list[Probe | None] = [None] * len(targets)
    if len(targets) == 1:
        h, p, k = targets[0]
        results[0] = probe(h, p, timeout, k)
    elif targets:
        left = [len(targets)]
        count = _thread.allocate_lock()
        all_done = _thread.allocate_lock()
        all_done.acquire()

        def work(i: int) -> None:
            try:
                h, p, k = targets[i]
                results[i] = probe(h, p, timeout, k)
            finally:
                with count:
                    left[0] -= 1
                    if left[0] == 0:
                        all_done.release()

        for i in range(len(targets)):
            _thread.start_new_thread(work, (i,))
        all_done.acquire(timeout=timeout * 2 + 1)
    return [r if r is not None else Probe(t[0], t[1], error="probe did not finish") for r, t in zip(results, targets)]
