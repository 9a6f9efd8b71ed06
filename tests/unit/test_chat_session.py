"""chat.py: source selection, the session (history, fallback to the cloud), and the REPL loop scripted."""

from __future__ import annotations

import pytest

from sage_llm.chat import session as chat
from sage_llm.chat.client import ServerUnreachable
from tests.fakes.fake_openai import FakeOpenAI
from tests.support.discipline import wait_for
from tests.support.ports import free_port


@pytest.fixture(autouse=True)
def _no_external_engines(monkeypatch: pytest.MonkeyPatch):
    """Other vLLM servers on this machine (not started by the test) must not count as local engines."""
    from sage_llm.engine import inspect as engine_inspect

    monkeypatch.setattr(engine_inspect, "discover_external", lambda *args, **kwargs: [])


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch):
    with FakeOpenAI(key="sk-cloud", models=("cloud-model",), reply="Hello from the cloud.") as api:
        monkeypatch.setenv("SAGE_CHAT_BASE_URL", api.base_url)
        monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-cloud")
        monkeypatch.setenv("SAGE_CHAT_MODEL", "cloud-model")
        yield api


@pytest.fixture
def local_api():
    """An OpenAI-compatible server standing in for a local engine (the session only sees a Target)."""
    with FakeOpenAI(key="sk-local", models=("tiny",), reply="Hello from local.") as api:
        yield api


def local_target(api: FakeOpenAI) -> chat.Target:
    return chat.Target(source="local", base_url=api.base_url, model="tiny", api_key="sk-local", engine="tiny-eng")


def script(lines: list[str]):
    it = iter(lines)
    prompts: list[str] = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read_line, prompts


# ---------------------------------------------------------------------------------------------------- sources
def test_cloud_needs_a_key_and_names_the_variables():
    with pytest.raises(chat.CloudNotConfigured) as ei:
        chat.resolve("cloud")
    assert ei.value.message == "no cloud API key: set SAGE_CHAT_API_KEY (or OPENAI_API_KEY)"
    assert ei.value.exit_code == 1


def test_cloud_falls_back_to_openai_variables(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-o")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    t = chat.resolve("cloud", model="gpt-x")
    assert (t.source, t.base_url, t.api_key, t.model) == ("cloud", "http://127.0.0.1:9/v1", "sk-o", "gpt-x")
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-s")
    monkeypatch.setenv("SAGE_CHAT_MODEL", "m-env")
    t = chat.resolve("cloud")
    assert (t.base_url, t.api_key, t.model) == (chat.DEFAULT_CLOUD_URL, "sk-s", "m-env")


def test_auto_with_nothing_names_both_ways():
    with pytest.raises(chat.NoSource) as ei:
        chat.resolve("auto")
    assert ei.value.message == "no local engine is ready, and no cloud API is configured"
    assert "sage-llm start MODEL" in ei.value.hint
    assert "SAGE_CHAT_API_KEY" in ei.value.hint


def test_auto_without_local_engine_uses_the_cloud(cloud):
    t = chat.resolve("auto")
    assert (t.source, t.base_url, t.model) == ("cloud", cloud.base_url, "cloud-model")


def test_local_with_nothing_ready_is_one_error():
    with pytest.raises(chat.NoLocalEngine) as ei:
        chat.resolve("local")
    assert ei.value.message == "no local engine is ready"
    assert "sage-llm start MODEL" in ei.value.hint


def test_unknown_engine_name_is_a_usage_error():
    with pytest.raises(chat.UsageError) as ei:
        chat.resolve("auto", "nosuch")
    assert "no engine named 'nosuch'" in ei.value.message


def test_target_with_cloud_source_is_a_usage_error(cloud):
    with pytest.raises(chat.UsageError):
        chat.resolve("cloud", "8001")


def test_port_with_nothing_listening(unused_port):
    with pytest.raises(chat.NoLocalEngine) as ei:
        chat.resolve("local", str(unused_port))
    assert f"on port {unused_port} is not ready" in ei.value.message


@pytest.fixture
def unused_port() -> int:
    return free_port()  # reserved for the test: nothing listens there


# ---------------------------------------------------------------------------------------------------- session
def test_session_keeps_history_and_system_prompt(local_api):
    s = chat.ChatSession(local_target(local_api), system="be brief")
    got: list[str] = []
    turn = s.ask("first", got.append, pytest.fail)
    assert turn.text == "Hello from local."
    assert "".join(got) == "Hello from local."
    s.ask("second", got.append, pytest.fail)
    assert local_api.requests[-1]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Hello from local."},
        {"role": "user", "content": "second"},
    ]
    assert s.clear() == "history cleared (2 exchanges forgotten)"
    s.ask("third", got.append, pytest.fail)
    assert [m["content"] for m in local_api.requests[-1]["messages"]] == ["be brief", "third"]
    assert len(s.history) == 3
    s.close()


def test_local_failure_mid_stream_retries_on_the_cloud(local_api, cloud):
    local_api.fail_after = 1
    s = chat.ChatSession(local_target(local_api), source_mode="auto")
    got: list[str] = []
    notices: list[str] = []
    turn = s.ask("hi", got.append, notices.append)
    assert turn.switched
    assert turn.text == "Hello from the cloud."
    assert got == ["Hello ", "Hello ", "from ", "the ", "cloud."]  # the broken local piece, then the cloud reply
    assert len(notices) == 1
    assert notices[0].startswith("local engine 'tiny-eng' failed (")
    assert notices[0].endswith(f"retrying this turn on the cloud: model cloud-model at {cloud.base_url}")
    assert s.target.source == "cloud"
    # the next turn goes straight to the cloud, with the history of the retried turn
    s.ask("again", got.append, pytest.fail)
    assert [m["content"] for m in cloud.requests[-1]["messages"]] == ["hi", "Hello from the cloud.", "again"]
    s.close()


def test_local_failure_without_cloud_is_raised(local_api):
    local_api.fail_after = 0
    s = chat.ChatSession(local_target(local_api), source_mode="auto")
    with pytest.raises(ServerUnreachable):
        s.ask("hi", lambda p: None, pytest.fail)
    assert s.messages == []  # a failed turn leaves no trace in the history
    s.close()


def test_source_local_does_not_fall_back(local_api, cloud):
    local_api.status = 500
    s = chat.ChatSession(local_target(local_api), source_mode="local")
    with pytest.raises(chat.SageLLMError, match=r"failed \(500\)"):
        s.ask("hi", lambda p: None, pytest.fail)
    assert cloud.requests == []
    s.close()


# ------------------------------------------------------------------------------------------------------- REPL
def test_read_message_multiline_forms():
    read, _ = script(['"""', "line 1", "line 2", '"""'])
    assert chat.read_message(read) == "line 1\nline 2"
    read, _ = script(['"""first', "second", 'third"""'])
    assert chat.read_message(read) == "first\nsecond\nthird"
    read, _ = script(['"""one line"""'])
    assert chat.read_message(read) == "one line"
    read, prompts = script(["!multi", "a", "", "b", "!end"])
    assert chat.read_message(read) == "a\n\nb"
    assert prompts == ["> ", "... ", "... ", "... ", "... "]
    read, _ = script(["!multi X", "a", "!end", "!end X"])
    assert chat.read_message(read) == "a\n!end"


def test_run_chat_scripted_session(local_api):
    s = chat.ChatSession(local_target(local_api))
    replies: list[str] = []
    notes: list[str] = []

    def send(text: str) -> None:
        replies.append(s.ask(text, lambda p: None, notes.append).text)

    read, _ = script(["", "hello", "/system talk like a pirate", "/stats", '"""', "multi", "line", '"""',
                      "/model", "/bogus", "/clear", "exit", "never read"])
    n = chat.run_chat(read, send, notes.append, s)
    assert n == 2
    assert replies == ["Hello from local.", "Hello from local."]
    assert local_api.requests[1]["messages"][0] == {"role": "system", "content": "talk like a pirate"}
    assert local_api.requests[1]["messages"][-1] == {"role": "user", "content": "multi\nline"}
    assert notes[0] == "system prompt set (18 characters)"
    assert notes[1].startswith("source: local (tiny-eng) · model: tiny · ")
    assert "turns: 1 (0 cancelled), history: 1 exchanges" in notes[1]
    assert "tokens: 4 prompt + 3 completion" in notes[1]
    assert notes[2:] == ["model: tiny", "unknown command /bogus; /help lists them",
                         "history cleared (2 exchanges forgotten)"]
    s.close()


def test_run_chat_ctrl_c_and_ctrl_d():
    calls: list[str] = []
    notes: list[str] = []
    events = iter(["a", KeyboardInterrupt(), "b"])

    def read(prompt: str) -> str:
        try:
            e = next(events)
        except StopIteration:
            raise EOFError from None
        if isinstance(e, BaseException):
            raise e
        return e

    def send(text: str) -> None:
        calls.append(text)
        if text == "a":
            raise KeyboardInterrupt  # Ctrl-C during the reply

    n = chat.run_chat(read, send, notes.append, chat.Commands())
    assert calls == ["a", "b"]
    assert n == 1
    assert notes == ["[reply cancelled]", "^C (Ctrl-D or /exit to leave)", ""]


def test_run_chat_reports_errors_and_goes_on():
    notes: list[str] = []

    def send(text: str) -> None:
        raise chat.SageLLMError("boom", hint="do this")

    read, _ = script(["x", "/source nowhere", "/exit"])
    chat.run_chat(read, send, notes.append, chat.ChatSession(chat.Target("cloud", "http://127.0.0.1:9/v1", "m")))
    assert notes == ["Error: boom (hint: do this)",
                     "Error: source must be one of auto, local, cloud (hint: e.g. /source cloud)"]


def test_ctrl_c_mid_reply_closes_the_connection_and_keeps_no_history(local_api):
    local_api.tokens = [f"t{i} " for i in range(500)]
    local_api.delay_s = 0.01
    s = chat.ChatSession(local_target(local_api))
    got: list[str] = []

    def on_text(piece: str) -> None:
        got.append(piece)
        if len(got) == 3:
            raise KeyboardInterrupt  # what Ctrl-C does, wherever the main thread is

    with pytest.raises(KeyboardInterrupt):
        s.ask("count", on_text, pytest.fail)
    assert s.messages == []
    assert s.history[-1].cancelled
    assert s.history[-1].completion_tokens == 3
    wait_for(lambda: local_api.disconnects, 30, what="the server to see the client disconnect")
    assert local_api.disconnects == 1  # the server saw the disconnect: vLLM aborts the request there
    local_api.tokens, local_api.delay_s = None, 0.0
    assert s.ask("again", lambda p: None, pytest.fail).text == "Hello from local."
    s.close()
