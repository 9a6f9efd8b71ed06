"""`sage llm chat` through the real CLI entry, against the fake vLLM (started through the CLI) and a fake cloud API."""

from __future__ import annotations

import io
import json
import re

import pytest

from tests.fakes.fake_openai import FakeOpenAI
from tests.support.ports import free_port

REPLY = "Hello from the fake vLLM."
STATS_RE = re.compile(r"^ttft \d+\.\d\d s · [\d.]+ tokens/s · \d+ prompt \+ 5 completion tokens · \d+\.\d\d s$",
                      re.MULTILINE)


@pytest.fixture(autouse=True)
def _no_external_engines(monkeypatch: pytest.MonkeyPatch):
    """vLLM servers of other users of this machine must not count as local engines here."""
    from sage_llm.engine import inspect as engine_inspect

    monkeypatch.setattr(engine_inspect, "discover_external", lambda *args, **kwargs: [])


@pytest.fixture
def engine(cli, fake_vllm, stop_all) -> int:
    port = free_port()
    code, _out, err = cli("start", "org/Tiny-Chat", "--port", str(port))
    assert code == 0, err
    return port


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch):
    with FakeOpenAI(key="sk-cloud", models=("cloud-model",), reply="Hello from the cloud.") as api:
        monkeypatch.setenv("SAGE_CHAT_BASE_URL", api.base_url)
        monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-cloud")
        monkeypatch.setenv("SAGE_CHAT_MODEL", "cloud-model")
        yield api


class FakeStdin(io.StringIO):
    """stdin for the CLI: a terminal or a pipe, and a hook run before a given line is read."""

    def __init__(self, text: str = "", tty: bool = False, before: dict | None = None) -> None:
        super().__init__(text)
        self.tty = tty
        self.before = before or {}
        self.reads = 0

    def isatty(self) -> bool:
        return self.tty

    def readline(self, *args) -> str:  # type: ignore[override]
        self.reads += 1
        hook = self.before.get(self.reads)
        if hook:
            hook()
        return super().readline(*args)


def test_one_shot_prints_only_the_answer_on_stdout(cli, engine):
    code, out, err = cli("chat", "-p", "Say hello")
    assert code == 0, err
    assert out == REPLY + "\n"
    lines = err.splitlines()
    assert lines[0] == f"source: local (tiny-chat) · model: org/Tiny-Chat · http://127.0.0.1:{engine}/v1"
    assert STATS_RE.search(err), err


def test_one_shot_by_port_and_by_name_and_plain(cli, engine):
    for args in ((str(engine), "-p", "hi"), ("tiny-chat", "-p", "hi", "--plain"), ("-p", "hi", "--no-stream")):
        code, out, err = cli("chat", *args)
        assert (code, out) == (0, REPLY + "\n"), err


def test_json_document(cli, engine):
    code, out, err = cli("chat", "-p", "hi", "--json", "--max-tokens", "3", "--temperature", "0")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"text", "model", "source", "base_url", "usage", "ttft_s", "tokens_per_s"}
    assert doc["text"] == "Hello from the "
    assert doc["model"] == "org/Tiny-Chat"
    assert doc["source"] == "local"
    assert doc["base_url"] == f"http://127.0.0.1:{engine}/v1"
    assert doc["usage"]["completion_tokens"] == 3
    assert doc["ttft_s"] > 0
    assert doc["tokens_per_s"] > 0


def test_piped_stdin_is_one_shot(cli, engine, monkeypatch):
    monkeypatch.setattr("sys.stdin", FakeStdin("What is in this file?\nline two\n"))
    code, out, err = cli("chat", "-s", "Summarise")
    assert (code, out) == (0, REPLY + "\n"), err


def test_empty_stdin_is_a_usage_error(cli, engine, monkeypatch):
    monkeypatch.setattr("sys.stdin", FakeStdin("  \n"))
    code, out, err = cli("chat")
    assert (code, out) == (2, "")
    assert err.startswith("Error: no prompt: stdin was empty")


def test_json_in_an_interactive_chat_is_a_usage_error(cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", FakeStdin("", tty=True))
    code, out, err = cli("chat", "--json")
    assert (code, out) == (2, "")
    assert err.startswith("Error: --json needs one prompt (-p TEXT or text on stdin), not an interactive chat")


def test_scripted_repl_session(cli, engine, monkeypatch):
    script = "hello\n/stats\n\"\"\"\nfirst line\nsecond line\n\"\"\"\n/system be short\n/clear\n/exit\nnot sent\n"
    monkeypatch.setattr("sys.stdin", FakeStdin(script))
    code, out, err = cli("chat", "-i")
    assert code == 0, err
    assert out == (REPLY + "\n") * 2
    assert "turns: 1 (0 cancelled), history: 1 exchanges" in err
    assert "system prompt set (8 characters)" in err
    assert "history cleared (2 exchanges forgotten)" in err
    assert len(STATS_RE.findall(err)) == 2


def test_unknown_model_lists_the_served_ones(cli, engine):
    code, out, err = cli("chat", "-p", "hi", "--model", "nope")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == (
        f"Error: model 'nope' is not served by local engine 'tiny-chat' at http://127.0.0.1:{engine}/v1; it serves: "
        "org/Tiny-Chat (hint: pick one with --model NAME (or /model NAME in the chat))")


def test_context_too_long_names_the_engine_max(cli, engine):
    code, out, err = cli("chat", "-p", "word " * 2100)
    assert (code, out) == (1, "")
    assert "Error: the conversation is too long for org/Tiny-Chat: the engine's max model length is 2048 tokens " \
           "(this request needs 2104)" in err
    assert "--max-model-len" in err


def test_engine_stopped_mid_session_says_which(cli, engine, monkeypatch):
    from sage_llm.engine import manager

    stdin = FakeStdin("one\ntwo\n", before={2: lambda: manager.stop("tiny-chat", timeout=5)})
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = cli("chat", "-i")
    assert code == 0, err
    assert out == REPLY + "\n"
    assert (f"Error: local engine 'tiny-chat' at http://127.0.0.1:{engine}/v1 is not running (connection refused) "
            "(hint: see `sage-llm status tiny-chat` and `sage-llm logs tiny-chat`)") in err


def test_engine_stopped_mid_session_switches_to_the_cloud(cli, engine, cloud, monkeypatch):
    from sage_llm.engine import manager

    stdin = FakeStdin("one\ntwo\nthree\n", before={2: lambda: manager.stop("tiny-chat", timeout=5)})
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = cli("chat", "-i")
    assert code == 0, err
    assert out == REPLY + "\n" + "Hello from the cloud.\n" * 2
    assert err.count("retrying this turn on the cloud") == 1
    assert f"Warning: local engine 'tiny-chat' failed (local engine 'tiny-chat' at http://127.0.0.1:{engine}/v1 " \
           f"is not running (connection refused)); retrying this turn on the cloud: model cloud-model at " \
           f"{cloud.base_url}" in err
    # the cloud got the whole conversation, including the turn answered locally
    assert [m["content"] for m in cloud.requests[-1]["messages"]] == ["one", REPLY, "two", "Hello from the cloud.",
                                                                      "three"]


def test_auto_uses_the_cloud_when_no_engine_is_ready(cli, cloud):
    code, out, err = cli("chat", "-p", "hi")
    assert (code, out) == (0, "Hello from the cloud.\n"), err
    assert err.splitlines()[0] == f"source: cloud · model: cloud-model · {cloud.base_url}"
    assert cloud.requests[-1]["model"] == "cloud-model"


def test_cloud_bad_key(cli, cloud, monkeypatch):
    monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-wrong")
    code, out, err = cli("chat", "--source", "cloud", "-p", "hi")
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == (f"Error: cloud API at {cloud.base_url} refused the API key (401): Incorrect API "
                                    "key provided. (hint: check SAGE_CHAT_API_KEY)")


def test_no_source_at_all(cli):
    code, out, err = cli("chat", "-p", "hi")
    assert (code, out) == (1, "")
    assert err.startswith("Error: no local engine is ready, and no cloud API is configured (hint: start one with "
                          "`sage-llm start MODEL`")
    assert "SAGE_CHAT_API_KEY" in err


def test_cloud_without_key_names_the_variables(cli):
    code, _out, err = cli("chat", "--source", "cloud", "-p", "hi")
    assert code == 1
    assert err.startswith("Error: no cloud API key: set SAGE_CHAT_API_KEY (or OPENAI_API_KEY)")


@pytest.mark.parametrize(("args", "message"), [
    (("--source", "mars", "-p", "x"), "--source must be one of auto, local, cloud, not 'mars'"),
    (("--temperature", "5", "-p", "x"), "--temperature 5 is out of range"),
    (("--max-tokens", "0", "-p", "x"), "--max-tokens 0 must be at least 1"),
    (("-p", " "), "-p/--prompt is empty"),
])
def test_bad_flags_are_usage_errors(cli, args, message):
    code, out, err = cli("chat", *args)
    assert (code, out) == (2, "")
    assert err.startswith(f"Error: {message}")


def test_engine_started_with_api_key_env_gets_its_key(cli, fake_vllm, stop_all, monkeypatch):
    monkeypatch.setenv("MY_ENGINE_KEY", "sk-engine")
    port = free_port()
    code, _out, err = cli("start", "org/Keyed", "--port", str(port), "--api-key-env", "MY_ENGINE_KEY")
    assert code == 0, err
    code, out, err = cli("chat", "keyed", "-p", "hi")
    assert (code, out) == (0, REPLY + "\n"), err
    monkeypatch.delenv("MY_ENGINE_KEY")
    code, out, err = cli("chat", "keyed", "-p", "hi")
    assert (code, out) == (1, "")
    assert f"Error: local engine 'keyed' at http://127.0.0.1:{port}/v1 refused the API key (401)" in err
    assert "hint: MY_ENGINE_KEY is not set in this shell; the engine was started with --api-key-env MY_ENGINE_KEY" \
           in err


# ------------------------------------------------------------------ a .env may not send the user's key elsewhere
@pytest.fixture
def project(tmp_path, monkeypatch):
    """A cloned repository as the current directory: its .env is read (the test isolation turns .env off)."""
    repo = tmp_path / "cloned-repo"
    repo.mkdir()
    monkeypatch.delenv("SAGE_LLM_DOTENV")
    monkeypatch.chdir(repo)
    return repo / ".env"


@pytest.fixture
def rogue():
    """The repository's server: it accepts any key, and records every Authorization header it is sent."""
    with FakeOpenAI(key="anything", models=("cloud-model",), reply="Thanks for the key.") as api:
        yield api


def test_dotenv_base_url_never_gets_the_users_environment_key(cli, project, rogue, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-user-secret")
    project.write_text(f"SAGE_CHAT_BASE_URL={rogue.base_url}\nSAGE_CHAT_MODEL=cloud-model\n")
    for args in (("--source", "cloud"), ()):  # also auto, falling back to the cloud for want of a local engine
        code, out, err = cli("chat", *args, "-p", "hi")
        assert (code, out) == (2, ""), err
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"Error: SAGE_CHAT_BASE_URL={rogue.base_url} comes only from {project}, and the API key "
                              "from the environment (OPENAI_API_KEY): your key is not sent to a server that a .env "
                              "file chose (hint: put that server's key in the same .env as SAGE_CHAT_API_KEY"), err
        assert "sk-user-secret" not in err
    assert rogue.auth_seen == []


def test_dotenv_base_url_never_gets_the_config_file_key(cli, project, rogue, monkeypatch):
    from sage_llm.core import settings

    settings.set_value("chat_api_key", "sk-config-secret")
    project.write_text(f"SAGE_CHAT_BASE_URL={rogue.base_url}\n")
    code, out, err = cli("chat", "--source", "cloud", "-p", "hi")
    assert (code, out) == (2, ""), err
    assert "and the API key from the config file (" in err
    assert rogue.auth_seen == []


def test_dotenv_base_url_on_loopback_is_refused_too(cli, project, rogue, monkeypatch):
    """Loopback is no exception: any local process may listen on the port the repository names."""
    monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-user-secret")
    project.write_text(f"SAGE_CHAT_BASE_URL=http://localhost:{rogue.port}/v1\n")
    code, _out, err = cli("chat", "--source", "cloud", "-p", "hi")
    assert code == 2, err
    assert "the API key from the environment (SAGE_CHAT_API_KEY)" in err
    assert rogue.auth_seen == []


def test_a_key_from_the_same_dotenv_goes_to_its_base_url(cli, project, rogue, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-user-secret")
    project.write_text(f"SAGE_CHAT_BASE_URL={rogue.base_url}\nSAGE_CHAT_API_KEY=anything\n")
    code, out, err = cli("chat", "--source", "cloud", "-p", "hi", "--model", "cloud-model")
    assert (code, out) == (0, "Thanks for the key.\n"), err
    assert set(rogue.auth_seen) == {"Bearer anything"}


def test_a_dotenv_base_url_the_user_also_configured_is_trusted(cli, project, cloud, monkeypatch):
    from sage_llm.core import settings

    monkeypatch.delenv("SAGE_CHAT_BASE_URL")
    settings.set_value("chat_base_url", cloud.base_url)
    project.write_text(f"SAGE_CHAT_BASE_URL={cloud.base_url}/\n")
    code, out, err = cli("chat", "--source", "cloud", "-p", "hi")
    assert (code, out) == (0, "Hello from the cloud.\n"), err


def test_engine_failure_does_not_fall_back_to_a_dotenv_base_url(cli, engine, project, rogue, monkeypatch):
    from sage_llm.engine import manager

    monkeypatch.setenv("OPENAI_API_KEY", "sk-user-secret")
    project.write_text(f"SAGE_CHAT_BASE_URL={rogue.base_url}\n")
    stdin = FakeStdin("one\ntwo\n", before={2: lambda: manager.stop("tiny-chat", timeout=5)})
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = cli("chat", "-i")
    assert code == 0, err
    assert out == REPLY + "\n"
    assert "failed; not retrying on the cloud: SAGE_CHAT_BASE_URL=" in err
    assert "is not running (connection refused)" in err
    assert rogue.auth_seen == []
