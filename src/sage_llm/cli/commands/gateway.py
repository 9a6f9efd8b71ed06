"""`sage-llm gateway run | start | stop | status`: one OpenAI-compatible endpoint for every local model."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

EPILOG = ("Examples: sage-llm gateway run | sage-llm gateway start --ttl 10m --max-engines 2 | "
          "curl localhost:8901/v1/models | sage-llm gateway status --json | sage-llm gateway stop. "
          "Default port 8901: where SAGE Studio looks (SAGE_LLM_PORT). Settings: flag > SAGE_LLM_GATEWAY_* > "
          "[gateway] in the config file; per-model profiles in [gateway.models.\"ORG/NAME\"] (docs/gateway.md).")

gateway_app = typer.Typer(help="One OpenAI-compatible endpoint that loads, swaps and unloads engines on demand.",
                          no_args_is_help=True, rich_markup_mode=None)

HostOpt = Annotated[str | None, typer.Option("--host", help="Address to bind (default 127.0.0.1). Anything but "
                                             "loopback needs keys (`gateway keys add`) or --api-key-env.",
                                             show_default=False)]
TlsCertOpt = Annotated[str | None, typer.Option("--tls-cert", help="PEM certificate (chain) file: serve HTTPS "
                                                "(with --tls-key).", show_default=False)]
TlsKeyOpt = Annotated[str | None, typer.Option("--tls-key", help="PEM private key file of --tls-cert.",
                                               show_default=False)]
PortOpt = Annotated[int | None, typer.Option("--port", "-p", help="Port (default 8901, where SAGE Studio looks).",
                                             show_default=False)]
TtlOpt = Annotated[str | None, typer.Option("--ttl", help="Stop an engine the gateway started after this long idle "
                                            "(e.g. 10m, 1h; 0 = never). Default 15m.", show_default=False)]
MaxOpt = Annotated[int | None, typer.Option("--max-engines", help="At most N engines loaded at once; the least "
                                            "recently used idle one is unloaded first (0 = no limit).",
                                            show_default=False)]
KeyOpt = Annotated[str | None, typer.Option("--api-key-env", help="NAME of an environment variable holding the key "
                                            "every client must send (Authorization: Bearer KEY).",
                                            show_default=False)]
FallbackOpt = Annotated[bool | None, typer.Option("--fallback/--no-fallback", help="Send models the local side "
                                                  "cannot serve to the cloud API (SAGE_CHAT_BASE_URL / key, as "
                                                  "`chat` uses). Default: on.", show_default=False)]
UpstreamOpt = Annotated[list[str] | None, typer.Option("--upstream", help="MODEL=URL: a static route to any "
                                                       "OpenAI-compatible server (URL ends in /v1); repeatable.",
                                                       show_default=False)]
EnginePortOpt = Annotated[int | None, typer.Option("--engine-port", help="Engines the gateway starts take the first "
                                                   "free port from here (default 8902).", show_default=False)]
SleepOpt = Annotated[bool | None, typer.Option("--sleep/--no-sleep", help="GPU only: put an engine to sleep (vLLM "
                                               "sleep level 1) instead of stopping it when making room.",
                                               show_default=False)]
KeepOpt = Annotated[bool, typer.Option("--keep-engines", help="On exit, leave the engines the gateway started "
                                       "running (a later gateway adopts them).")]
ExternalOpt = Annotated[bool | None, typer.Option("--external/--no-external", help="Also route to vLLM servers not "
                                                  "started by sage-llm. Default: on.", show_default=False)]
OriginOpt = Annotated[list[str] | None, typer.Option("--allow-origin", help="A web origin (e.g. "
                                                     "http://studio.example:8765) allowed to send requests; "
                                                     "repeatable. Loopback origins are always allowed.",
                                                     show_default=False)]
ReplicasOpt = Annotated[list[str] | None, typer.Option("--replicas", help="MODEL=N (N engines of MODEL) or "
                                                       "MODEL=MIN:MAX (scale with load); repeatable. Each replica "
                                                       "counts toward --max-engines.", show_default=False)]
ClusterOpt = Annotated[str | None, typer.Option("--cluster", help="HOST:PORT of a Ray head: place the engines the "
                                                "gateway loads on the cluster's nodes (Ray chooses where they fit).",
                                                show_default=False)]
ClusterKeyOpt = Annotated[str | None, typer.Option("--cluster-key-env", help="NAME of the variable holding the "
                                                   "engines' key, set here and on every node (default "
                                                   "SAGE_LLM_CLUSTER_KEY).", show_default=False)]


def _resolve(p: dict[str, Any]) -> Any:
    from sage_llm.gateway import options

    return options.resolve(host=p["host"], port=p["port"], ttl=p["ttl"], max_engines=p["max_engines"],
                           api_key_env=p["api_key_env"], fallback=p["fallback"], upstreams=p["upstream"],
                           engine_port=p["engine_port"], sleep=p["sleep"], keep_engines=p["keep_engines"] or None,
                           allowed_origins=p["allow_origin"], external=p["external"], tls_cert=p["tls_cert"],
                           tls_key=p["tls_key"], replicas=p["replicas"], cluster=p["cluster"],
                           cluster_key_env=p["cluster_key_env"])


@gateway_app.command("run", epilog=EPILOG)
def run(host: HostOpt = None, port: PortOpt = None, ttl: TtlOpt = None, max_engines: MaxOpt = None,
        api_key_env: KeyOpt = None, fallback: FallbackOpt = None, upstream: UpstreamOpt = None,
        engine_port: EnginePortOpt = None, sleep: SleepOpt = None, keep_engines: KeepOpt = False,
        external: ExternalOpt = None, allow_origin: OriginOpt = None, tls_cert: TlsCertOpt = None,
        tls_key: TlsKeyOpt = None, replicas: ReplicasOpt = None, cluster: ClusterOpt = None,
        cluster_key_env: ClusterKeyOpt = None) -> None:
    """Run the gateway in the foreground. Ctrl-C stops it and the engines it started (unless --keep-engines)."""
    opts = _resolve(locals())
    from sage_llm.gateway import server

    def ready(gw: Any) -> None:
        from sage_llm.gateway.events import describe

        def show(event: dict[str, Any]) -> None:
            line = describe(event)
            if line:
                out.info(line)

        gw.bus.listeners.append(show)
        host_ = opts.host if ":" not in opts.host else f"[{opts.host}]"
        out.result(f"gateway ready: {opts.scheme}://{host_}:{opts.port}/v1 (pid {__import__('os').getpid()})")
        if opts.cluster:
            out.info(f"cluster {opts.cluster}: engines are placed on its nodes (their key: ${opts.cluster_key_env}, "
                     "read on each node)")
        out.hint("models: GET /v1/models | management: /api/local-engine/status | events: /api/events | "
                 "Ctrl-C stops it")

    gw = server.serve(opts, ready=ready)
    for name in gw.stopped_engines:
        out.info(f"stopped engine {name!r}")


@gateway_app.command("start", epilog=EPILOG)
def start(host: HostOpt = None, port: PortOpt = None, ttl: TtlOpt = None, max_engines: MaxOpt = None,
          api_key_env: KeyOpt = None, fallback: FallbackOpt = None, upstream: UpstreamOpt = None,
          engine_port: EnginePortOpt = None, sleep: SleepOpt = None, keep_engines: KeepOpt = False,
          external: ExternalOpt = None, allow_origin: OriginOpt = None, tls_cert: TlsCertOpt = None,
          tls_key: TlsKeyOpt = None, replicas: ReplicasOpt = None, cluster: ClusterOpt = None,
          cluster_key_env: ClusterKeyOpt = None, json_: JsonOpt = False) -> None:
    """Start the gateway in the background, recorded in the state directory (`gateway status` shows it)."""
    p = dict(locals())
    opts = _resolve(p)
    from sage_llm.gateway import daemon

    rec = daemon.start(opts)
    if json_:
        out.print_json({k: rec[k] for k in ("pid", "host", "port", "url", "started_at", "log_file")})
        return
    out.result(f"gateway started: {rec['url']} (pid {rec['pid']})")
    out.hint(f"log: {rec['log_file']} | stop: sage-llm gateway stop")


@gateway_app.command("stop", epilog=EPILOG)
def stop(timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait before SIGKILL (the gateway "
                                                "first stops the engines it started).")] = 120.0) -> None:
    """Stop the background gateway (and, unless it was started with --keep-engines, the engines it started)."""
    from sage_llm.core.errors import UsageError
    from sage_llm.gateway import daemon

    if timeout < 0:
        raise UsageError(f"--timeout {timeout:g} must not be negative", hint="e.g. --timeout 60")
    out.result(daemon.stop(timeout))


@gateway_app.command("status", epilog=EPILOG)
def status(json_: JsonOpt = False) -> None:
    """Is the background gateway running, where, and is it healthy? Exit 3 when it is not running."""
    from sage_llm.gateway import daemon

    st = daemon.record_status(probe=True, nodes=True)
    if json_:
        out.print_json(st or {"running": False})
    elif st is None:
        out.result("no gateway is running (start one: sage-llm gateway start)")
    elif not st["running"]:
        out.result(f"the gateway (pid {st['pid']}) is not running (record left: `sage-llm gateway stop` clears it)")
    else:
        health = "healthy" if st.get("healthy") else "not answering /health"
        out.result(f"gateway running: {st['url']} (pid {st['pid']}, since {st['started_at']}, {health})")
        if st.get("cluster"):
            _show_nodes(st["cluster"])
    if not st or not st["running"]:
        raise typer.Exit(3)


def _show_nodes(view: dict[str, Any]) -> None:
    """The gateway's cluster: each node with its free GPUs and CPUs as Ray sees them."""
    from sage_llm.engine.cluster import describe_node

    if "error" in view:
        out.result(f"cluster {view['address']}: cannot ask it: {view['error']}")
        return
    alive = sum(1 for n in view["nodes"] if n["alive"])
    out.result(f"cluster {view['address']}: {alive} of {len(view['nodes'])} node(s) alive")
    for n in view["nodes"]:
        out.result(f"  node {describe_node(n)}")


# ------------------------------------------------------------------------------------------------ shared gateway
keys_app = typer.Typer(help="Keys per person for a shared gateway (roles, model patterns, limits).",
                       no_args_is_help=True, rich_markup_mode=None)
gateway_app.add_typer(keys_app, name="keys")
KEYS_EPILOG = ("Examples: sage-llm gateway keys add alice --models 'Qwen/*' --max-concurrency 4 | "
               "sage-llm gateway keys add bob --role admin | sage-llm gateway keys list | "
               "sage-llm gateway keys rotate alice | sage-llm gateway keys rm alice. Once a key exists, every "
               "request to the gateway needs one (except GET /health); a running gateway sees changes at once.")
NameArg = Annotated[str, typer.Argument(help="The key's name (a person or a job), e.g. alice.", show_default=False)]


def _show_secret(key: Any, secret: str, verb: str) -> None:
    out.info(f"{verb} key {key.name!r} ({key.role}; models {', '.join(key.models)}):")
    out.result(secret)  # alone on stdout: KEY=$(sage-llm gateway keys add NAME) works
    out.hint("shown once: only its hash is kept. Clients send it as `Authorization: Bearer KEY`.")


@keys_app.command("add", epilog=KEYS_EPILOG)
def keys_add(name: NameArg,
             role: Annotated[str, typer.Option("--role", help="user (chat with allowed models, read status) or "
                                               "admin (also start, stop, pull, remove, logs).")] = "user",
             models: Annotated[list[str] | None, typer.Option("--models", help="Model name pattern this key may "
                                                              "use (fnmatch, e.g. 'Qwen/*'); repeatable. Default: "
                                                              "all.", show_default=False)] = None,
             max_concurrency: Annotated[int | None, typer.Option("--max-concurrency", help="At most N requests "
                                                                 "in flight (more: 429).", show_default=False)] = None,
             tokens_per_minute: Annotated[int | None, typer.Option("--tokens-per-minute", help="At most N prompt + "
                                                                   "completion tokens a minute (more: 429).",
                                                                   show_default=False)] = None) -> None:
    """Add a key and print its secret (once)."""
    from sage_llm.gateway import keys

    key, secret = keys.add(name, role, models, max_concurrency, tokens_per_minute)
    _show_secret(key, secret, "new")


@keys_app.command("list", epilog=KEYS_EPILOG)
def keys_list(json_: JsonOpt = False) -> None:
    """The keys: name, role, models, limits, created (never the secret)."""
    from sage_llm.gateway import keys

    rows = keys.listing()
    if json_:
        out.print_json([k.public() for k in rows])
        return
    if not rows:
        if keys.path().exists():
            out.result(f"no keys: a gateway refuses every client (add one: sage-llm gateway keys add NAME; or delete "
                       f"{keys.path()} to go back to the open loopback mode)")
        else:
            out.result("no keys: the gateway accepts any client on loopback (add one: sage-llm gateway keys add NAME)")
        return
    for k in rows:
        limits = ", ".join(f"{n} {v}" for n, v in (("max-concurrency", k.max_concurrency),
                                                  ("tokens/min", k.tokens_per_minute)) if v is not None)
        out.result(f"{k.name:<20} {k.role:<6} models {','.join(k.models):<24} {limits or 'no limits'}  "
                   f"created {k.created}")


@keys_app.command("rm", epilog=KEYS_EPILOG)
def keys_rm(name: NameArg) -> None:
    """Revoke a key: its next request is refused (a stream in progress finishes)."""
    from sage_llm.gateway import keys

    keys.remove(name)
    out.result(f"removed key {name!r}")


@keys_app.command("rotate", epilog=KEYS_EPILOG)
def keys_rotate(name: NameArg) -> None:
    """A new secret for a key (same role and limits); the old secret stops working at once."""
    from sage_llm.gateway import keys

    key, secret = keys.rotate(name)
    _show_secret(key, secret, "rotated")


@gateway_app.command("usage", epilog="Examples: sage-llm gateway usage | sage-llm gateway usage --since 7d --by "
                     "model | sage-llm gateway usage --by key,model --json")
def usage(since: Annotated[str | None, typer.Option("--since", help="Only the last DURATION (e.g. 7d, 12h).",
                                                    show_default=False)] = None,
          by: Annotated[str, typer.Option("--by", help="Group by key, model, or key,model.")] = "key",
          json_: JsonOpt = False) -> None:
    """Requests, prompt and completion tokens (the engine's own counts) and errors, per key or model."""
    from sage_llm.gateway import usage as usage_

    rows = usage_.summarize(usage_.parse_since(since), by)
    if json_:
        out.print_json([r.to_json() for r in rows])
        return
    if not rows:
        out.result("no usage recorded (usage is kept once the gateway has keys: sage-llm gateway keys add NAME)")
        return
    for r in rows:
        who = r.key if by == "key" else r.model if by == "model" else f"{r.key} {r.model}"
        out.result(f"{who:<32} {r.requests:>8} requests {r.prompt_tokens:>10} prompt {r.completion_tokens:>10} "
                   f"completion {r.errors:>6} errors")
