"""vLLM's Prometheus `/metrics`: a small text-format parser, per-scrape summaries, rates and histogram quantiles.

Standard library only (it runs once a second in `sage-llm top`). Metric names are vLLM 0.32/0.33's
(docs: vllm/v1/metrics/loggers.py): gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` (0-1; older releases called it `vllm:gpu_cache_usage_perc`), counters with a `_total`
suffix (`vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `vllm:request_success_total`) and histograms as
`_bucket{le=...}`, `_sum`, `_count` (`vllm:time_to_first_token_seconds`). Series are summed over their label sets
(`engine` = data-parallel rank, `model_name`, `finished_reason`, ...).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]

_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_labels(text: str, i: int) -> tuple[Labels, int]:
    """Labels starting after '{' at text[i]; returns (labels, index after '}')."""
    labels: list[tuple[str, str]] = []
    n = len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i < n and text[i] == "}":
            return tuple(labels), i + 1
        eq = text.index("=", i)
        key = text[i:eq].strip()
        i = eq + 1
        while text[i] == " ":
            i += 1
        if text[i] != '"':
            raise ValueError(f"label {key!r} has no quoted value")
        i += 1
        buf: list[str] = []
        while True:
            c = text[i]
            if c == "\\":
                buf.append(_ESCAPES.get(text[i + 1], "\\" + text[i + 1]))
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                j = text.find('"', i)
                k = text.find("\\", i)
                stop = j if k < 0 or (0 <= j < k) else k
                buf.append(text[i:stop])
                i = stop
        labels.append((key, "".join(buf)))
    raise ValueError("unterminated label set")


def _float(token: str) -> float:
    t = token.lower()
    if t in ("+inf", "inf"):
        return math.inf
    if t == "-inf":
        return -math.inf
    if t == "nan":
        return math.nan
    return float(token)


def parse(text: str, only: tuple[str, ...] | None = None) -> dict[str, list[tuple[Labels, float]]]:
    """Prometheus text exposition -> {sample name: [(labels, value), ...]}. Comments, blank and malformed lines are
    skipped (one bad line never loses the rest of the scrape); timestamps are ignored. With `only`, lines that do not
    start with one of those prefixes are skipped unparsed (a real vLLM serves ~600 lines; `top` needs ~30)."""
    out: dict[str, list[tuple[Labels, float]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#" or (only is not None and not line.startswith(only)):
            continue
        try:
            end = 0
            while end < len(line) and line[end] not in " \t{":
                end += 1
            name = line[:end]
            while end < len(line) and line[end] in " \t":
                end += 1
            labels: Labels = ()
            if end < len(line) and line[end] == "{":
                labels, end = _parse_labels(line, end + 1)
            rest = line[end:].split()
            if not rest:
                continue
            value = _float(rest[0])
        except (ValueError, IndexError):
            continue
        out.setdefault(name, []).append((labels, value))
    return out


def types(text: str) -> dict[str, str]:
    """{family name: type} from the `# TYPE` lines."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                found[parts[2]] = parts[3]
    return found


def total(series: dict[str, list[tuple[Labels, float]]], name: str) -> float | None:
    """The sum of every sample of `name` (over all label sets), or None when absent."""
    samples = series.get(name)
    if not samples:
        return None
    return sum(v for _labels, v in samples if not math.isnan(v))


def buckets(series: dict[str, list[tuple[Labels, float]]], name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets [(le, count)], summed over label sets, sorted by le ("+Inf" last)."""
    acc: dict[float, float] = {}
    for labels, value in series.get(f"{name}_bucket", []):
        le = dict(labels).get("le")
        if le is None:
            continue
        try:
            bound = _float(le)
        except ValueError:
            continue
        acc[bound] = acc.get(bound, 0.0) + value
    return sorted(acc.items())


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets: linear interpolation inside the bucket holding the
    q-th observation. None with no observations; the highest finite bound when it falls in the +Inf bucket."""
    if not cumulative:
        return None
    count = cumulative[-1][1]
    if count <= 0 or math.isnan(count):
        return None
    rank = q * count
    prev_bound, prev_count = 0.0, 0.0
    for bound, c in cumulative:
        if c >= rank:
            if math.isinf(bound):
                return prev_bound
            if c == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = bound, c
    return prev_bound


def subtract(new: list[tuple[float, float]], old: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Buckets observed between two scrapes (new - old); `new` alone after a reset (the engine restarted)."""
    before = dict(old)
    diff = [(le, c - before.get(le, 0.0)) for le, c in new]
    if any(d < 0 for _le, d in diff):
        return new
    return diff


@dataclass
class Scrape:
    """One read of an engine's /metrics, summed over label sets."""

    at: float  # time.monotonic() of the read
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None  # 0-1
    prompt_tokens: float | None = None  # counters (since the engine started)
    generation_tokens: float | None = None
    requests_ok: float | None = None
    ttft: list[tuple[float, float]] = field(default_factory=list)  # cumulative buckets, seconds


SUMMARY_SERIES = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_bucket",
)


def summarize(text: str, at: float | None = None) -> Scrape:
    s = parse(text, only=SUMMARY_SERIES)
    kv = s.get("vllm:kv_cache_usage_perc") or s.get("vllm:gpu_cache_usage_perc") or []
    kv_values = [v for _labels, v in kv if not math.isnan(v)]
    return Scrape(
        at=time.monotonic() if at is None else at,
        running=total(s, "vllm:num_requests_running"),
        waiting=total(s, "vllm:num_requests_waiting"),
        kv_cache_usage=max(kv_values) if kv_values else None,
        prompt_tokens=total(s, "vllm:prompt_tokens_total"),
        generation_tokens=total(s, "vllm:generation_tokens_total"),
        requests_ok=total(s, "vllm:request_success_total"),
        ttft=buckets(s, "vllm:time_to_first_token_seconds"),
    )


def rate(old: Scrape | None, new: Scrape, attr: str) -> float | None:
    """Per-second increase of counter `attr` between two scrapes (Prometheus semantics: a drop is a reset)."""
    if old is None:
        return None
    a, b = getattr(old, attr), getattr(new, attr)
    dt = new.at - old.at
    if a is None or b is None or dt <= 0:
        return None
    inc = b - a if b >= a else b
    return inc / dt


def ttft_p50(window: Iterable[Scrape]) -> tuple[float | None, bool]:
    """(median time to first token, recent): over the requests seen in `window` (oldest..newest scrape), else over
    everything since the engine started (recent=False). None when no request has been served."""
    scrapes = [s for s in window if s.ttft]
    if not scrapes:
        return None, False
    newest = scrapes[-1]
    if len(scrapes) > 1:
        recent = subtract(newest.ttft, scrapes[0].ttft)
        if recent and recent[-1][1] > 0:
            return quantile(0.5, recent), True
    return quantile(0.5, newest.ttft), False


def fetch(host: str, port: int, timeout: float = 0.5) -> str:
    """GET /metrics (vLLM serves it without the API key), on the probes' raw-socket client. Raises OSError on
    failure (refused, timeout, an answer other than 200)."""
    import time

    from sage_llm.observe.probe import http_get

    status, body = http_get(host, port, "/metrics", time.monotonic() + timeout, limit=8 << 20)
    if status != 200:
        raise OSError(f"/metrics answered {status}")
    return body.decode("utf-8", "replace")
