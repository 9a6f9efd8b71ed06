"""`sage llm chat` against the real CPU vLLM serving the tiny model that always answers TINY_REPLY.

One engine for the whole test (they take ~25-40 s to start on 2 cores): one-shot, piped stdin, --json, a scripted
REPL session, the 404 for an unknown model, Ctrl-C mid-reply (vLLM stops generating), and the engine stopped under
a session.
"""

from __future__ import annotations

import io
import json
import re
import time
import urllib.request

import pytest

from tests.integration.conftest import TINY_REPLY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]
LONG_CONTEXT = 16384  # tokens of context the engine gets (the KV cache for it: 4 MiB with this model)
MAX_TOKENS = 16000  # the reply cancelled mid-way


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    # `name` is a metric name, or a name with the first labels of the set (`name{engine="0",finished_reason="abort"`)
    opening = re.escape(name) if "{" in name else re.escape(name) + r"\{"
    return sum(float(m.group(1)) for m in re.finditer(rf"^{opening}[^}}]*}} (\S+)$", text, re.MULTILINE))


def _generated(port: int) -> float:
    return _metric(port, "vllm:generation_tokens_total")


def _finished(port: int, reason: str) -> float:
    """vLLM's count of requests that ended for `reason` (stop, length, abort, error, repetition)."""
    return _metric(port, f'vllm:request_success_total{{engine="0",finished_reason="{reason}"')


def _aborted(log_file: str) -> int:
    """Requests vLLM logged as aborted ("Aborted request(s) ID." with --enable-log-requests)."""
    with open(log_file, errors="replace") as fh:
        return sum(line.count("Aborted request(s)") for line in fh)


def _running(port: int) -> bool:
    return _metric(port, "vllm:num_requests_running") > 0


class Stdin(io.StringIO):
    def __init__(self, text: str, tty: bool = False) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture(autouse=True)
def _only_our_engine(monkeypatch: pytest.MonkeyPatch):
    """Engines of other users of this machine must not be picked as "the first ready one"."""
    from sage_llm.engine import inspect as engine_inspect

    monkeypatch.setattr(engine_inspect, "discover_external", lambda *args, **kwargs: [])


@pytest.mark.usefixtures("real_vllm", "stop_all")
def test_chat_with_the_real_engine(cli, tiny_model: str, engine_port, monkeypatch: pytest.MonkeyPatch) -> None:
    port = engine_port()
    # a context long enough that the Ctrl-C below always lands mid-generation, however fast the CPU: the tiny model
    # was built with 1024 positions, its RoPE goes further (--hf-overrides lets vLLM use them)
    code, _out, err = cli("start", tiny_model, "--name", "chatreal", "--port", str(port), "--enforce-eager",
                          "--max-model-len", str(LONG_CONTEXT), "--timeout", "300", "--", "--enable-log-requests",
                          "--hf-overrides", json.dumps({"max_position_embeddings": LONG_CONTEXT}))
    assert code == 0, err
    url = f"http://127.0.0.1:{port}/v1"

    # one-shot: only the answer on stdout
    code, out, err = cli("chat", "-p", "Hi", "--temperature", "0")
    assert code == 0, err
    assert out == TINY_REPLY + "\n"
    assert err.splitlines()[0] == f"source: local (chatreal) · model: {tiny_model} · {url}"
    assert "completion tokens" in err.splitlines()[-1]

    # piped stdin, engine named by port
    monkeypatch.setattr("sys.stdin", Stdin("Hello there\n"))
    code, out, err = cli("chat", str(port), "--temperature", "0")
    assert (code, out) == (0, TINY_REPLY + "\n"), err

    # --json, not streamed and streamed
    for extra in ((), ("--no-stream",)):
        code, out, err = cli("chat", "chatreal", "-p", "Hi", "--temperature", "0", "--json", *extra)
        assert code == 0, err
        doc = json.loads(out)
        assert doc["text"] == TINY_REPLY
        assert (doc["model"], doc["source"], doc["base_url"]) == (tiny_model, "local", url)
        assert doc["usage"]["completion_tokens"] > 0
        assert doc["usage"]["prompt_tokens"] > 0
        assert doc["ttft_s"] > 0

    # a scripted REPL session: two turns (history kept, then cleared), slash commands
    monkeypatch.setattr("sys.stdin", Stdin("Hi\n/stats\nHello\n/clear\n\"\"\"\nHow\nare you\n\"\"\"\n/exit\n"))
    code, out, err = cli("chat", "-i", "--temperature", "0")
    assert code == 0, err
    assert out == (TINY_REPLY + "\n") * 3
    assert "turns: 1 (0 cancelled), history: 1 exchanges" in err
    assert "history cleared (2 exchanges forgotten)" in err

    # unknown model: the served one is listed
    code, out, err = cli("chat", "-p", "Hi", "--model", "nope")
    assert (code, out) == (2, "")
    assert f"Error: model 'nope' is not served by local engine 'chatreal' at {url}; it serves: {tiny_model}" in err

    # Ctrl-C in the middle of a reply: the connection is closed and vLLM aborts the request (ignore_eos would make it
    # write all MAX_TOKENS tokens otherwise: tens of seconds on any CPU, so finishing first is no way to pass; with
    # 480 tokens a fast CPU wrote them all before the third piece was read, issue 12)
    from sage_llm.chat import session as core
    from sage_llm.core.state import StateStore

    log_file = StateStore().load("chatreal").log_file
    aborted_before = _aborted(log_file)
    before = {"tokens": _generated(port), **{r: _finished(port, r) for r in ("length", "stop")}}
    session = core.ChatSession(core.resolve("local", "chatreal"), temperature=0, max_tokens=MAX_TOKENS,
                               extra_body={"ignore_eos": True})
    pieces: list[str] = []

    def ctrl_c_after_three(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("Hi", ctrl_c_after_three, pytest.fail)
    session.close()
    deadline = time.monotonic() + 60
    while _running(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(port), "vLLM still generates for a reply the user cancelled"
    # vLLM itself says it aborted the request (--enable-log-requests), and the request never finished: no "length"
    # (all MAX_TOKENS written) or "stop" counted. vLLM 0.32 does not count client aborts in
    # request_success_total{finished_reason="abort"}, hence the log line.
    deadline = time.monotonic() + 10
    while _aborted(log_file) == aborted_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _aborted(log_file) == aborted_before + 1
    assert (_finished(port, "length"), _finished(port, "stop")) == (before["length"], before["stop"])
    assert _generated(port) - before["tokens"] < MAX_TOKENS

    # the engine stopped under a session: one line naming it
    from sage_llm.engine import manager

    class StopThenAsk(Stdin):
        def readline(self, *args) -> str:  # type: ignore[override]
            line = super().readline(*args)
            if line == "again\n":
                manager.stop("chatreal", timeout=30)
            return line

    monkeypatch.setattr("sys.stdin", StopThenAsk("Hi\nagain\n"))
    code, out, err = cli("chat", "-i", "--temperature", "0")
    assert code == 0, err
    assert out == TINY_REPLY + "\n"
    assert f"Error: local engine 'chatreal' at {url} is not running (connection refused)" in err
