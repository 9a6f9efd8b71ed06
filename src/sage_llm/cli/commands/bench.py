"""`sage-llm bench [NAME|PORT]`: many concurrent streaming chat requests; TTFT, inter-token latency, throughput."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

EPILOG = ("Examples: sage-llm bench | sage-llm bench qwen --concurrency 16 --requests 200 | "
          "sage-llm bench 8001 --prompt-tokens 512 --max-tokens 128 --json | "
          "sage-llm bench --url http://10.0.0.5:8000/v1 --model my-model. "
          "Exit 1 when any request failed (they are counted and listed).")


def bench(
    target: Annotated[str | None, typer.Argument(help="Engine name or port (default: the only ready engine).",
                                                 show_default=False, autocompletion=_complete.engines)] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Requests in flight at once.")] = 8,
    requests: Annotated[int, typer.Option("--requests", "-n", help="Requests to send in all.")] = 100,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt tokens of each request, chat template "
                                                "included, as the engine counts them.")] = 32,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens of each request.")] = 64,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Ask vLLM to always generate --max-tokens.")]
    = False,
    url: Annotated[str | None, typer.Option("--url", help="Benchmark this OpenAI-compatible base URL instead "
                                            "(e.g. http://host:8000/v1).", show_default=False)] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name to request (default: the engine's).",
                                              show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds allowed per request.")] = 300.0,
    json_: JsonOpt = False,
) -> None:
    """Load an engine with concurrent streaming chat requests and report latency and throughput.

    Measures time to first token (p50/p90/p99), inter-token latency, output tokens/s and requests/s, and
    cross-checks the token counts with the engine's /metrics counters.
    """
    from sage_llm.bench import loadgen
    from sage_llm.bench import target as bench_target

    base_url, served, api_key, name = bench_target.resolve(target, url, model)
    cfg = loadgen.BenchConfig(base_url=base_url, model=served, concurrency=concurrency, requests=requests,
                              prompt_tokens=prompt_tokens, max_tokens=max_tokens, api_key=api_key,
                              timeout_s=timeout, ignore_eos=ignore_eos)
    cfg.validate()
    out.info(f"bench {name or base_url}: {requests} requests, concurrency {concurrency}, {prompt_tokens} prompt "
             f"tokens, max_tokens {max_tokens}")
    live = _LiveView(enabled=sys.stderr.isatty())
    try:
        report = loadgen.run_sync(cfg, on_progress=live.update)
    finally:
        live.close()
    doc = report.to_json()
    doc["engine"] = name
    if json_:
        out.print_json(doc)
    else:
        _final_table(doc)
    for err, count in doc["errors"].items():
        out.warning(f"{count} request(s) failed: {err}")
    deviation = loadgen.prompt_deviation(doc)
    if deviation:
        out.warning(deviation)
    sm = doc["server_metrics"]
    if sm.get("available") and not sm.get("generation_tokens_match"):
        out.warning(f"the engine counted {sm['generation_tokens']} generated tokens, the client "
                    f"{doc['total_output_tokens']}: {sm.get('note')}")
    elif not sm.get("available") and sm.get("error"):
        out.info(f"no cross-check with the engine's counters: {sm['error']}")
    if doc["failed"]:
        raise typer.Exit(1)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _prompt_row(doc: dict[str, Any]) -> str:
    sent = doc.get("prompt_tokens_per_request")
    how = (doc.get("prompt") or {}).get("method")
    where = "engine usage" if doc.get("token_counts_from") == "usage" else "no usage from the server"
    calibrated = ", calibrated with /tokenize" if how == "tokenize" else ", words (no /tokenize)" if how else ""
    return f"{'-' if sent is None else f'{sent:g}'} ({doc['prompt_tokens']} asked; {where}{calibrated})"


def _final_table(doc: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=None, box=None, pad_edge=False, header_style="bold")
    for col in ("METRIC", "MEAN", "P50", "P90", "P99"):
        t.add_column(col, justify="left" if col == "METRIC" else "right")
    for label, key in (("TTFT (ms)", "ttft_s"), ("inter-token (ms)", "itl_s"), ("time/output token (ms)", "tpot_s"),
                       ("latency (ms)", "latency_s")):
        d = doc[key]
        t.add_row(label, _ms(d["mean"]), _ms(d["p50"]), _ms(d["p90"]), _ms(d["p99"]))
    out.console().print(t)
    sm = doc["server_metrics"]
    check = "-"
    if sm.get("available"):
        check = (f"engine counted {sm['generation_tokens']} out / {sm['prompt_tokens']} in"
                 + (" (match)" if sm.get("generation_tokens_match") else " (MISMATCH)"))
    rows = [
        ("requests", f"{doc['completed']} ok, {doc['failed']} failed in {doc['duration_s']:.2f} s"),
        ("request throughput", f"{_num(doc['request_throughput'], '{:.2f}')} req/s"),
        ("output throughput", f"{_num(doc['output_throughput'])} tok/s"),
        ("prompt tokens/request", _prompt_row(doc)),
        ("tokens (client)", f"{doc['total_output_tokens']} out / {doc['total_prompt_tokens'] or '-'} in "
                            f"(from {doc['token_counts_from']})"),
        ("tokens (engine /metrics)", check),
    ]
    s = Table(box=None, pad_edge=False, show_header=False)
    s.add_column()
    s.add_column()
    for k, v in rows:
        s.add_row(k, v)
    out.console().print(s)


class _LiveView:
    """A Rich live panel on stderr while the load runs (terminals only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.live: Any = None

    def update(self, snap: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from rich.live import Live
        from rich.text import Text

        ttft = snap.get("ttft_p50_s")
        text = Text(f"{snap['done']}/{snap['total']} done  {snap['errors']} errors  "
                    f"{snap['request_throughput']:.1f} req/s  {snap['output_throughput']:.0f} tok/s  "
                    f"TTFT p50 {_ms(ttft)} ms  {snap['elapsed_s']:.1f} s")
        if self.live is None:
            self.live = Live(text, console=out.console(stderr=True), refresh_per_second=4, transient=True)
            self.live.start()
        else:
            self.live.update(text)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
