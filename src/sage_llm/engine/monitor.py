"""The data behind `sage-llm top`: one `Frame` per tick (GPUs, engines, rates, history). No Rich, no Typer.

Cost per tick is kept small because `top` runs for hours at 1 Hz: the engine list (a /proc pass plus /health and
/v1/models probes, `manager.inspect`) is refreshed every `rediscover_s` seconds or when a scrape fails; each tick only
reads every engine's `/metrics` (in parallel, short timeouts) and one NVML snapshot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sage_llm.observe import gpu, metrics

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class EngineRow:
    key: str
    name: str
    state: str
    managed: bool = True
    stage: str | None = None
    progress: float | None = None
    model: str | None = None
    port: int | None = None
    node: str | None = None  # the Ray node of an engine placed on a cluster; None: this machine
    pid: int | None = None
    vram_bytes: int | None = None
    gpus: list[int] = field(default_factory=list)
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prompt_tps: float | None = None
    generation_tps: float | None = None
    ttft_p50_s: float | None = None
    ttft_recent: bool = False
    metrics_error: str | None = None
    generation_history: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class GpuRow:
    info: gpu.GpuInfo
    memory_history: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Frame:
    at: float  # wall clock
    interval: float
    history_s: float
    gpus: list[GpuRow] = field(default_factory=list)
    gpu_error: str | None = None
    engines: list[EngineRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    now: float = 0.0  # monotonic time of the frame (the history's clock)


def sparkline(points: list[tuple[float, float]], width: int, span: float, now: float,
              top: float | None = None) -> str:
    """`width` characters over the last `span` seconds (oldest left): each character is the mean of the samples in
    its slice of time, scaled to `top` (default: the largest value shown); a blank where there is no sample."""
    if width <= 0:
        return ""
    start = now - span
    step = span / width
    sums = [0.0] * width
    counts = [0] * width
    for t, v in points:
        if t < start or v is None:
            continue
        i = min(width - 1, int((t - start) / step))
        sums[i] += v
        counts[i] += 1
    means = [sums[i] / counts[i] if counts[i] else None for i in range(width)]
    peak = top if top is not None else max((m for m in means if m is not None), default=0.0)
    out = []
    for m in means:
        if m is None:
            out.append(" ")
        elif peak <= 0:
            out.append(SPARK[0])
        else:
            out.append(SPARK[max(0, min(len(SPARK) - 1, int(m / peak * (len(SPARK) - 1) + 0.5)))])
    return "".join(out)


def _key(view: Any) -> str:
    return view.name or f"port-{view.port}"


class Monitor:
    def __init__(self, store: Any = None, interval: float = 1.0, history_s: float = 300.0, rediscover_s: float = 5.0,
                 fetch: Callable[[str, int, float], str] = metrics.fetch, clock: Callable[[], float] = time.monotonic,
                 include_external: bool = True) -> None:
        self.store = store
        self.interval = interval
        self.history_s = history_s
        self.rediscover_s = rediscover_s
        self.fetch = fetch
        self.clock = clock
        self.include_external = include_external
        self.views: list[Any] = []
        self.warnings: list[str] = []
        self._discovered_at: float | None = None
        self._scrapes: dict[str, deque[metrics.Scrape]] = {}
        self._gen: dict[str, deque[tuple[float, float]]] = {}
        self._gpu_mem: dict[str, deque[tuple[float, float]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._maxlen = int(history_s / max(interval, 0.05)) + 2

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # ---- engines ----
    def _discover(self, now: float) -> None:
        from sage_llm.engine.inspect import inspect
        from sage_llm.engine.status import local_port

        self.views, self.warnings = inspect(self.store, include_external=self.include_external, probe_timeout=0.3,
                                            local_port=local_port())
        self._discovered_at = now
        keys = {_key(v) for v in self.views}
        for table in (self._scrapes, self._gen):
            for k in [k for k in table if k not in keys]:
                del table[k]

    def _scrape_all(self, targets: list[Any]) -> list[tuple[str | None, str | None]]:
        from sage_llm.core.addresses import reachable_host

        def one(v: Any) -> tuple[str | None, str | None]:
            try:
                return self.fetch(reachable_host(v.host), v.port, 0.5), None
            except Exception as exc:  # refused, timeout, HTTP error: shown on the row
                return None, f"/metrics: {exc.__class__.__name__}: {exc}".rstrip(": ")

        if len(targets) <= 1:
            return [one(v) for v in targets]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sage-top")
        return list(self._pool.map(one, targets))

    # ---- one tick ----
    def tick(self) -> Frame:
        from sage_llm.engine.status import attach_gpu

        now = self.clock()
        if self._discovered_at is None or now - self._discovered_at >= self.rediscover_s:
            self._discover(now)
        targets = [v for v in self.views if v.port and v.state in ("ready", "unhealthy")]
        results = self._scrape_all(targets)
        failed = False
        rows: dict[str, EngineRow] = {}
        for v in self.views:
            rows[_key(v)] = EngineRow(key=_key(v), name=v.name or f"port {v.port}", state=v.state, managed=v.managed,
                                      stage=v.stage, progress=v.progress, model=v.served_model_name or v.model,
                                      port=v.port, pid=v.pid, node=v.node)
        for v, (text, err) in zip(targets, results):
            row = rows[_key(v)]
            if text is None:
                row.metrics_error = err
                failed = True
                continue
            scrape = metrics.summarize(text, at=now)
            hist = self._scrapes.setdefault(row.key, deque(maxlen=self._maxlen))
            prev = hist[-1] if hist else None
            hist.append(scrape)
            row.running, row.waiting, row.kv_cache_usage = scrape.running, scrape.waiting, scrape.kv_cache_usage
            row.prompt_tps = metrics.rate(prev, scrape, "prompt_tokens")
            row.generation_tps = metrics.rate(prev, scrape, "generation_tokens")
            window = [s for s in hist if now - s.at <= 60.0]
            row.ttft_p50_s, row.ttft_recent = metrics.ttft_p50(window)
            gen = self._gen.setdefault(row.key, deque(maxlen=self._maxlen))
            if row.generation_tps is not None:
                gen.append((now, row.generation_tps))
        if failed:
            self._discovered_at = None  # an engine went away or changed: look again next tick
        for k, gen in self._gen.items():
            if k in rows:
                rows[k].generation_history = list(gen)
        snap = gpu.snapshot(with_processes=True)
        attach_gpu(self.views, snap)
        for v in self.views:
            row = rows[_key(v)]
            row.vram_bytes = v.gpu_memory_bytes
            row.gpus = [g["index"] for g in v.gpus if g.get("index") is not None]
        gpu_rows = []
        for g in snap.gpus:
            key = g.uuid or str(g.index)
            hist_mem = self._gpu_mem.setdefault(key, deque(maxlen=self._maxlen))
            if g.memory_used_bytes is not None:
                hist_mem.append((now, float(g.memory_used_bytes)))
            gpu_rows.append(GpuRow(g, list(hist_mem)))
        return Frame(at=time.time(), interval=self.interval, history_s=self.history_s, gpus=gpu_rows,
                     gpu_error=snap.error, engines=list(rows.values()), warnings=list(self.warnings), now=now)
