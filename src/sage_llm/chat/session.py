"""Chat: choosing the source (local engine or cloud API), the conversation, and the REPL loop. No I/O of its own.

Sources:
  local  the named engine (NAME or PORT), else the one on SAGE_LOCAL_ENGINE_PORT, else the first ready engine
  cloud  any OpenAI-compatible API: SAGE_CHAT_BASE_URL / SAGE_CHAT_API_KEY / SAGE_CHAT_MODEL, falling back to
         OPENAI_BASE_URL / OPENAI_API_KEY
  auto   local when one is ready, else cloud when configured. If the local engine fails during a session, the turn
         is retried on the cloud (when configured) and the switch is announced.

`run_chat(read_line, send, write, commands)` owns only the REPL: prompts, multi-line input, slash commands, Ctrl-C
and Ctrl-D. The CLI gives it the functions that read, render and print.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sage_llm.core.config import EnvVars, env_str
from sage_llm.core.errors import SageLLMError, UsageError

SOURCES = ("auto", "local", "cloud")
DEFAULT_CLOUD_URL = "https://api.openai.com/v1"


class ChatEnv:
    BASE_URL = "SAGE_CHAT_BASE_URL"
    API_KEY = "SAGE_CHAT_API_KEY"
    MODEL = "SAGE_CHAT_MODEL"
    OPENAI_BASE_URL = "OPENAI_BASE_URL"
    OPENAI_API_KEY = "OPENAI_API_KEY"


class NoLocalEngine(SageLLMError):
    """No local engine is ready (or the named one is not)."""


class CloudNotConfigured(SageLLMError):
    """No API key for the cloud source."""


class NoSource(SageLLMError):
    """auto: neither a local engine nor a cloud API."""


class UntrustedBaseURL(UsageError):
    """The cloud base URL comes only from ./.env, the API key from the user's environment or config file."""


@dataclass
class Target:
    """A resolved chat source: where requests go and what to call it."""

    source: str  # "local" | "cloud"
    base_url: str
    model: str | None
    api_key: str | None = None
    engine: str | None = None  # engine name (local)
    max_model_len: int | None = None
    key_hint: str | None = None
    down_hint: str | None = None

    @property
    def label(self) -> str:
        return f"local engine {self.engine!r}" if self.source == "local" and self.engine else f"{self.source} API"

    def endpoint(self, model: str | None = None) -> Any:
        from sage_llm.chat.client import Endpoint

        return Endpoint(base_url=self.base_url, model=model or self.model, api_key=self.api_key, label=self.label,
                        key_hint=self.key_hint, down_hint=self.down_hint, max_model_len=self.max_model_len)

    def describe(self) -> str:
        where = f"{self.source}" + (f" ({self.engine})" if self.engine and self.source == "local" else "")
        return f"source: {where} · model: {self.model or '(server default)'} · {self.base_url}"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "engine": self.engine, "model": self.model, "base_url": self.base_url}


# ------------------------------------------------------------------------------------------------------- sources
def _local_port() -> int | None:
    raw = env_str(EnvVars.LOCAL_PORT)
    return int(raw) if raw and raw.isdigit() else None


def _local_target(view: Any, record: Any = None) -> Target:
    from sage_llm.core import engine_keys
    from sage_llm.core.state import api_key_for

    rec = record if record is not None else getattr(view, "record", None)
    key = api_key_for(rec) if rec is not None else None
    key_hint = None
    if rec is not None and engine_keys.is_gateway_key(rec.api_key_env):
        key_hint = ("the engine was started by a gateway: its key derives from the gateway secret in the state "
                    "directory of the user who ran it (this user's is missing or unreadable): chat as that user, "
                    "or through the gateway: SAGE_CHAT_BASE_URL=http://127.0.0.1:8901/v1 sage-llm chat --source "
                    "cloud")
    elif rec is not None and rec.api_key_env:
        key_hint = f"the engine was started with --api-key-env {rec.api_key_env}: set {rec.api_key_env} to its key"
        if key is None:
            key_hint = f"{rec.api_key_env} is not set in this shell; " + key_hint
    name = view.name or f"port {view.port}"
    return Target(source="local", base_url=view.base_url, model=view.served_model_name or view.model,
                  api_key=key, engine=name, max_model_len=view.max_model_len, key_hint=key_hint,
                  down_hint=f"see `sage-llm status {name}` and `sage-llm logs {name}`" if view.managed
                  else f"see `sage-llm status {view.port}`")


START_HINT = "start one with `sage-llm start MODEL` (e.g. sage-llm start Qwen/Qwen2.5-1.5B-Instruct)"


def _probe_view(host: str, port: int, record: Any = None) -> Any:
    """An EngineView for one address, probed now (no process scan)."""
    from sage_llm.core.state import api_key_for
    from sage_llm.engine.view import EngineView, apply_probe
    from sage_llm.observe import probe as probes

    served = record.served_model_name if record is not None else None
    view = EngineView(name=record.name if record is not None else f"external-{port}", managed=record is not None,
                      state="stopped", model=record.model if record is not None else None, served_model_name=served,
                      host=host, port=port, base_url=record.base_url if record is not None
                      else f"http://{host}:{port}/v1", record=record)
    p = probes.probe(host, port, timeout=1.0, api_key=api_key_for(record) if record is not None else None)
    apply_probe(view, served, p, "running")
    if p.refused:
        view.state = "stopped"
    if view.state == "ready" and view.model is None and p.models:
        view.model = p.models[0].get("root") or view.served_model_name
    return view


def resolve_local(target: str | None = None, store: Any = None) -> Target:
    """The named engine (NAME or PORT), else the one on SAGE_LOCAL_ENGINE_PORT, else the first ready one."""
    from sage_llm.core.addresses import reachable_host
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine.inspect import inspect

    store = store or StateStore()
    records = [r for r in store.all() if isinstance(r, EngineRecord)]
    if target is not None:
        rec = next((r for r in records if r.name == target), None)
        if rec is None and target.isdigit():
            rec = next((r for r in records if r.port == int(target)), None)
        if rec is None and not target.isdigit():
            known = ", ".join(r.name for r in records) or "none"
            raise UsageError(f"no engine named {target!r} (engines: {known})",
                             hint="see `sage-llm status`, or give a PORT")
        if rec is not None:
            view = _probe_view(reachable_host(rec.host), rec.port, rec)
        else:
            view = _probe_view("127.0.0.1", int(target))
        if view.state != "ready":
            what = view.error or ("nothing answers there" if view.state == "stopped" else view.state)
            raise NoLocalEngine(f"engine {view.name!r} on port {view.port} is not ready ({view.state}: {what})",
                                hint=f"see `sage-llm status {view.name if rec is not None else view.port}`"
                                if rec is not None else START_HINT)
        return _local_target(view, rec)
    port = _local_port()
    if port is not None:
        rec = next((r for r in records if r.port == port), None)
        view = _probe_view(reachable_host(rec.host) if rec else "127.0.0.1", port, rec)
        if view.state == "ready" and (rec is not None or view.served_model_name):
            return _local_target(view, rec)
    views, _warnings = inspect(store, include_external=True, local_port=port)
    ready = [v for v in views if v.state == "ready" and v.base_url]
    if not ready:
        starting = [v for v in views if v.state == "starting"]
        more = f" ({', '.join(str(v.name) for v in starting)} still starting)" if starting else ""
        raise NoLocalEngine(f"no local engine is ready{more}", hint=START_HINT if not starting else
                            f"wait for it: `sage-llm status {starting[0].name}`")
    return _local_target(ready[0])


def cloud_configured() -> bool:
    return bool(env_str(ChatEnv.API_KEY) or env_str(ChatEnv.OPENAI_API_KEY))


def _check_key_destination(base: str, key_var: str) -> None:
    """A key from the environment or the config file never goes to a base URL that only ./.env chose.

    A `.env` is the current directory's: in a cloned repository it is the repository's choice, so it may name the
    server but not receive the user's own key there. A key from the same .env is that project's key for its server
    and is fine. A loopback URL is no exception (any local process can listen there, and the repository chose it).
    The .env URL is trusted when it equals one the user set (OPENAI_BASE_URL in the environment, the config file).
    """
    from sage_llm.core import settings

    base_src = settings.source_of(ChatEnv.BASE_URL)
    if base_src is None or base_src[0] != "dotenv":
        return
    key_src = settings.source_of(key_var)
    if key_src is not None and key_src[0] == "dotenv":
        return
    own = (settings.config_value(ChatEnv.BASE_URL), os.environ.get(ChatEnv.OPENAI_BASE_URL))
    if base.rstrip("/") in {u.strip().rstrip("/") for u in own if u and u.strip()}:
        return
    key_where = (f"the config file ({key_src[1]})" if key_src is not None and key_src[0] == "config"
                 else f"the environment ({key_var})")
    raise UntrustedBaseURL(
        f"{ChatEnv.BASE_URL}={base} comes only from {base_src[1]}, and the API key from {key_where}: "
        "your key is not sent to a server that a .env file chose",
        hint=f"put that server's key in the same .env as {ChatEnv.API_KEY}, or, if you trust the URL, set "
             f"{ChatEnv.BASE_URL} in the environment or with `sage-llm config set chat_base_url {base}`")


def resolve_cloud(model: str | None = None) -> Target:
    key = env_str(ChatEnv.API_KEY) or env_str(ChatEnv.OPENAI_API_KEY)
    if not key:
        raise CloudNotConfigured(f"no cloud API key: set {ChatEnv.API_KEY} (or {ChatEnv.OPENAI_API_KEY})",
                                 hint=f"also {ChatEnv.BASE_URL} (default {DEFAULT_CLOUD_URL}) and "
                                      f"{ChatEnv.MODEL} for other OpenAI-compatible APIs")
    base = env_str(ChatEnv.BASE_URL) or env_str(ChatEnv.OPENAI_BASE_URL) or DEFAULT_CLOUD_URL
    which = ChatEnv.API_KEY if env_str(ChatEnv.API_KEY) else ChatEnv.OPENAI_API_KEY
    _check_key_destination(base, which)
    model = model or env_str(ChatEnv.MODEL)
    return Target(source="cloud", base_url=base.rstrip("/"), model=model, api_key=key,
                  key_hint=f"check {which}", down_hint=f"check {ChatEnv.BASE_URL} / {ChatEnv.OPENAI_BASE_URL}")


def resolve(source: str = "auto", target: str | None = None, model: str | None = None, store: Any = None) -> Target:
    """Pick the source. `model` overrides the served model (local) or SAGE_CHAT_MODEL (cloud)."""
    if source not in SOURCES:
        raise UsageError(f"--source must be one of {', '.join(SOURCES)}, not {source!r}", hint="e.g. --source local")
    from sage_llm.engine.vllm import check_model_name

    check_model_name(model, "--model", hint="give a model the source serves, or leave --model out for its default")
    if source == "cloud":
        if target is not None:
            raise UsageError("NAME|PORT picks a local engine; it cannot go with --source cloud",
                             hint="drop NAME|PORT, or use --source local")
        return resolve_cloud(model)
    if source == "local" or target is not None:
        t = resolve_local(target, store)
    else:
        try:
            t = resolve_local(None, store)
        except NoLocalEngine as exc:
            if cloud_configured():
                return resolve_cloud(model)
            raise NoSource(f"{exc.message}, and no cloud API is configured",
                           hint=f"{START_HINT}; or set {ChatEnv.API_KEY} (or {ChatEnv.OPENAI_API_KEY}) and "
                                f"{ChatEnv.BASE_URL} for a cloud API") from exc
    if model:
        t.model = model
    return t


# ------------------------------------------------------------------------------------------------------- session
@dataclass
class Turn:
    text: str
    stats: Any  # client.TurnStats
    target: Target
    switched: bool = False  # the turn was retried on the cloud


@dataclass
class ChatSession:
    """History, settings and stats of one conversation; sends turns through `client.ChatStream`."""

    target: Target
    source_mode: str = "auto"
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    stream: bool = True
    messages: list[dict[str, str]] = field(default_factory=list)
    history: list[Any] = field(default_factory=list)  # TurnStats of every reply
    model_override: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)  # more request fields (e.g. vLLM's top_k)
    http: dict[bool, Any] = field(default_factory=dict)  # httpx.Client per kind of URL (https or not), reused
    resolver: Callable[..., Target] = resolve

    def client(self) -> Any:
        tls = not self.target.base_url.startswith("http://")
        if tls not in self.http:
            from sage_llm.chat.client import make_client

            self.http[tls] = make_client(base_url=self.target.base_url)
        return self.http[tls]

    def close(self) -> None:
        for c in self.http.values():
            c.close()
        self.http.clear()

    def request_messages(self, text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return [*msgs, *self.messages, {"role": "user", "content": text}]

    def ask(self, text: str, on_text: Callable[[str], None], on_notice: Callable[[str], None]) -> Turn:
        """Send one user turn, streaming the reply into `on_text`. History changes only when the reply completes.

        A local engine that breaks (refused, dropped, 5xx) in auto mode with a cloud configured: the turn is retried
        on the cloud, announced through `on_notice`, and the session stays on the cloud.
        """
        from sage_llm.chat.client import ChatError

        try:
            return self._ask_once(text, on_text)
        except ChatError as exc:
            if not (exc.retryable and self.target.source == "local" and self.source_mode == "auto"
                    and cloud_configured()):
                raise
            failed = self.target
            try:
                cloud = resolve_cloud(self.model_override if self.model_override else None)
            except UntrustedBaseURL as refusal:
                on_notice(f"{failed.label} failed; not retrying on the cloud: {refusal.message} "
                          f"(hint: {refusal.hint})")
                raise exc from None
            on_notice(f"{failed.label} failed ({exc.message}); retrying this turn on the cloud: "
                      f"model {cloud.model or '(server default)'} at {cloud.base_url}")
            self.target = cloud
            turn = self._ask_once(text, on_text)
            turn.switched = True
            return turn

    def _ask_once(self, text: str, on_text: Callable[[str], None]) -> Turn:
        from sage_llm.chat.client import ChatStream, TurnStats

        target = self.target
        stream = ChatStream(self.client(), target.endpoint(), self.request_messages(text), stream=self.stream,
                            temperature=self.temperature, max_tokens=self.max_tokens, extra_body=self.extra_body)
        try:
            with stream:
                for piece in stream:
                    on_text(piece)
        except KeyboardInterrupt:
            stream.result.cancelled = True
            stats = TurnStats.of(stream.result, target.source)
            self.history.append(stats)
            raise
        stats = TurnStats.of(stream.result, target.source)
        self.history.append(stats)
        reply = stream.result.text
        self.messages.append({"role": "user", "content": text})
        self.messages.append({"role": "assistant", "content": reply})
        turn = Turn(text=reply, stats=stats, target=target)
        turn.result = stream.result  # type: ignore[attr-defined]
        return turn

    # slash-command actions
    def clear(self) -> str:
        n = len(self.messages) // 2
        self.messages.clear()
        return f"history cleared ({n} exchange{'s' if n != 1 else ''} forgotten)"

    def set_system(self, text: str) -> str:
        self.system = text or None
        return f"system prompt set ({len(text)} characters)" if text else "system prompt removed"

    def set_model(self, name: str) -> str:
        if not name:
            return f"model: {self.target.model or '(server default)'}"
        self.model_override = name
        self.target.model = name
        return f"model set to {name}"

    def set_source(self, mode: str) -> str:
        if not mode:
            return f"source mode {self.source_mode}; now {self.target.describe()}"
        if mode not in SOURCES:
            raise UsageError(f"source must be one of {', '.join(SOURCES)}", hint="e.g. /source cloud")
        target = self.resolver(mode, None, self.model_override)
        self.source_mode, self.target = mode, target
        return target.describe()

    def stats_text(self) -> str:
        done = [s for s in self.history if not s.cancelled]
        lines = [self.target.describe(),
                 f"turns: {len(self.history)} ({len(self.history) - len(done)} cancelled), "
                 f"history: {len(self.messages) // 2} exchanges"]
        prompt = sum(s.prompt_tokens or 0 for s in self.history)
        completion = sum(s.completion_tokens or 0 for s in self.history)
        lines.append(f"tokens: {prompt} prompt + {completion} completion")
        ttfts = [s.ttft_s for s in done if s.ttft_s is not None]
        speeds = [s.tokens_per_s for s in done if s.tokens_per_s is not None]
        if ttfts:
            lines.append(f"ttft: last {ttfts[-1]:.2f} s, mean {sum(ttfts) / len(ttfts):.2f} s")
        if speeds:
            lines.append(f"speed: last {speeds[-1]:.1f} tokens/s, mean {sum(speeds) / len(speeds):.1f} tokens/s")
        if self.history:
            lines.append("last reply: " + self.history[-1].line())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- REPL
HELP = """\
Type a message and press Enter. Commands:
  /help                  this help
  /exit, /quit, exit     leave (or Ctrl-D)
  /clear                 forget the conversation so far
  /system TEXT           set the system prompt (/system alone removes it)
  /model NAME            use another model (/model alone shows it)
  /source auto|local|cloud
                         switch where requests go (/source alone shows it)
  /stats                 time to first token, tokens/s and token counts
  \"\"\"                    start multi-line input; end it with \"\"\" on its own line
                         (or !multi ... !end)
Ctrl-C cancels the reply being written and keeps the session."""

MULTI_OPEN = ('"""', "!multi")
MULTI_CLOSE = {'"""': '"""', "!multi": "!end"}


class Commands:
    """What the slash commands act on (ChatSession implements it)."""

    def clear(self) -> str: ...
    def set_system(self, text: str) -> str: ...
    def set_model(self, name: str) -> str: ...
    def set_source(self, mode: str) -> str: ...
    def stats_text(self) -> str: ...


def read_message(read_line: Callable[[str], str], prompt: str = "> ", more: str = "... ") -> str:
    """One message: a line, or a multi-line block between \"\"\" (or !multi / !end) lines. EOFError on Ctrl-D."""
    line = read_line(prompt)
    stripped = line.strip()
    opener = next((o for o in MULTI_OPEN if stripped.startswith(o)), None)
    if opener is None:
        return line
    close = MULTI_CLOSE[opener]
    first = stripped[len(opener):]
    if opener == '"""' and first.endswith('"""') and len(first) >= 3:
        return first[:-3]  # """one line"""
    if opener == "!multi" and first.strip():
        close = f"!end {first.strip()}"  # custom delimiter, as in simonw/llm
        first = ""
    lines = [first] if first else []
    while True:
        nxt = read_line(more)
        if nxt.rstrip().endswith(close) and (opener == '"""' or nxt.strip() == close):
            tail = nxt.rstrip()[: -len(close)]
            if tail:
                lines.append(tail)
            return "\n".join(lines)
        lines.append(nxt)


def run_chat(read_line: Callable[[str], str], send: Callable[[str], None], write: Callable[[str], None],
             commands: Commands, prompt: str = "> ") -> int:
    """The REPL. `read_line(prompt)` raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C; `send(text)` streams
    one reply (Ctrl-C inside it cancels that reply); `write` prints a notice. Returns the number of turns sent."""
    sent = 0
    while True:
        try:
            text = read_message(read_line, prompt)
        except EOFError:
            write("")
            return sent
        except KeyboardInterrupt:
            write("^C (Ctrl-D or /exit to leave)")
            continue
        stripped = text.strip()
        if not stripped:
            continue
        if stripped in ("exit", "quit") or stripped.split()[0] in ("/exit", "/quit", "/bye"):
            return sent
        if stripped.startswith("/") and "\n" not in stripped:
            cmd, _, arg = stripped.partition(" ")
            arg = arg.strip()
            try:
                if cmd in ("/help", "/?"):
                    write(HELP)
                elif cmd == "/clear":
                    write(commands.clear())
                elif cmd == "/system":
                    write(commands.set_system(arg))
                elif cmd == "/model":
                    write(commands.set_model(arg))
                elif cmd == "/source":
                    write(commands.set_source(arg))
                elif cmd == "/stats":
                    write(commands.stats_text())
                else:
                    write(f"unknown command {cmd}; /help lists them")
            except SageLLMError as exc:
                write(f"Error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""))
            continue
        try:
            send(text)
            sent += 1
        except KeyboardInterrupt:
            write("[reply cancelled]")
        except SageLLMError as exc:
            write(f"Error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""))


def history_file() -> str:
    from sage_llm.core import paths

    return str(paths.home() / "chat_history")

