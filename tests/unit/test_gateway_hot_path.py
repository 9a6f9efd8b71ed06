"""The gateway's per-request helpers made cheaper (the request histogram, the body splice, the affinity key's header
lookup) answer exactly what the plain versions did."""

from __future__ import annotations

import json
import re

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sage_llm.gateway import bodies
from sage_llm.gateway.balance import affinity_key
from sage_llm.gateway.metrics import BUCKETS, Metrics


def test_the_request_histogram_is_cumulative_at_every_bound() -> None:
    m = Metrics()
    durations = [0.0, 0.005, 0.0051, 0.01, 0.3, 1.0, 299.0, 300.0, 301.0, 1e6, *BUCKETS]
    for d in durations:
        m.request("org/m", "local", 200, d)
    text = m.render([], 0)
    got = {float(le) if le != "+Inf" else float("inf"): int(n) for le, n in re.findall(
        r'sage_llm_gateway_request_duration_seconds_bucket\{model="org/m",source="local",le="([^"]+)"\} (\d+)', text)}
    want = {b: sum(d <= b for d in durations) for b in BUCKETS}
    want[float("inf")] = len(durations)
    assert got == want
    assert f'sage_llm_gateway_request_duration_seconds_count{{model="org/m",source="local"}} {len(durations)}' in text
    assert f'sage_llm_gateway_request_duration_seconds_sum{{model="org/m",source="local"}} {sum(durations):.6f}' \
        in text


@pytest.mark.parametrize("raw", [
    b'{"model":"m","stream":true}',
    b' {\n "model" : "m", "x": [1, {"y": "}"}] , "z": "{" }\n\t ',
    b'{}',
    b'{ }',
    '{"content": "é ü", "n": 0.50, "e": 1E3, "u": "\\u00e9"}'.encode(),
])
def test_a_member_is_appended_and_the_rest_kept_byte_for_byte(raw: bytes) -> None:
    out = bodies.add_member(raw, "stream_options", {"include_usage": True})
    body = bodies.parse_object(out)  # strict: one valid object, no duplicate key
    assert body == {**json.loads(raw), "stream_options": {"include_usage": True}}
    assert out.startswith(raw.rstrip()[:-1].rstrip())
    assert out.endswith(b'"stream_options": {"include_usage": true}}')


def test_the_session_header_is_found_in_any_case_from_a_request_or_a_mapping() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    plain = affinity_key(body, {"X-Session-ID": "s1", "Host": "h"})
    proxy = affinity_key(body, CIMultiDictProxy(CIMultiDict({"x-SESSION-id": "s1", "Host": "h"})))
    assert plain == proxy == affinity_key(body, {"x-session-id": "s1"})
    assert plain is not None
    assert plain.startswith("session:")
    assert affinity_key(body, CIMultiDict({"Host": "h"})) == affinity_key(body)  # no session: the prompt's prefix


def test_a_key_without_a_token_limit_keeps_only_a_minute_of_spent_tokens(tmp_path, monkeypatch) -> None:
    """Regression: every finished request of a key appended (time, tokens) to its window, and only a key with a
    tokens_per_minute limit ever trimmed it: a gateway serving unlimited keys grew by one entry per request."""
    from sage_llm.gateway import fairshare
    from sage_llm.gateway.usage import Meter, UsageLog

    clock = [1000.0]
    monkeypatch.setattr(fairshare.time, "monotonic", lambda: clock[0])
    share = fairshare.Share(UsageLog(tmp_path), {})
    for _ in range(600):  # ten minutes of one request a second
        meter = Meter("alice", "org/m", True, share._done)
        meter.prompt, meter.completion = 3, 5
        meter.finish(200)
        clock[0] += 1.0
    assert 59 <= len(share.spent["alice"]) <= 61
    assert sum(n for _, n in share.spent["alice"]) <= 61 * 8
    share.usage.close()


def test_upstream_sockets_notice_a_peer_gone_silent() -> None:
    """The gateway's upstream sockets probe a silent peer (keep-alive after 5 s, 3 probes 2 s apart) and give up on
    data unacknowledged for 12 s: a node whose link went down fails the requests on its reused connections."""
    import socket

    from sage_llm.gateway import server

    assert server._socket_factory() == {"socket_factory": server._upstream_socket}  # the aiohttp installed here
    info = socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)[0]
    with server._upstream_socket(info) as s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12000
