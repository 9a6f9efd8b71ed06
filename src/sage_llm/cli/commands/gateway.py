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
                                             "loopback needs --api-key-env.", show_default=False)]
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


def _resolve(p: dict[str, Any]) -> Any:
    from sage_llm.gateway import options

    return options.resolve(host=p["host"], port=p["port"], ttl=p["ttl"], max_engines=p["max_engines"],
                           api_key_env=p["api_key_env"], fallback=p["fallback"], upstreams=p["upstream"],
                           engine_port=p["engine_port"], sleep=p["sleep"], keep_engines=p["keep_engines"] or None,
                           allowed_origins=p["allow_origin"], external=p["external"])


@gateway_app.command("run", epilog=EPILOG)
def run(host: HostOpt = None, port: PortOpt = None, ttl: TtlOpt = None, max_engines: MaxOpt = None,
        api_key_env: KeyOpt = None, fallback: FallbackOpt = None, upstream: UpstreamOpt = None,
        engine_port: EnginePortOpt = None, sleep: SleepOpt = None, keep_engines: KeepOpt = False,
        external: ExternalOpt = None, allow_origin: OriginOpt = None) -> None:
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
        out.result(f"gateway ready: http://{host_}:{opts.port}/v1 (pid {__import__('os').getpid()})")
        out.hint("models: GET /v1/models | management: /api/local-engine/status | events: /api/events | "
                 "Ctrl-C stops it")

    gw = server.serve(opts, ready=ready)
    for name in gw.stopped_engines:
        out.info(f"stopped engine {name!r}")


@gateway_app.command("start", epilog=EPILOG)
def start(host: HostOpt = None, port: PortOpt = None, ttl: TtlOpt = None, max_engines: MaxOpt = None,
          api_key_env: KeyOpt = None, fallback: FallbackOpt = None, upstream: UpstreamOpt = None,
          engine_port: EnginePortOpt = None, sleep: SleepOpt = None, keep_engines: KeepOpt = False,
          external: ExternalOpt = None, allow_origin: OriginOpt = None, json_: JsonOpt = False) -> None:
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
