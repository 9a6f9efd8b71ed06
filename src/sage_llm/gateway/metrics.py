"""The gateway's own Prometheus metrics (GET /metrics, text exposition format 0.0.4). No client library."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(d: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in d.items()) + "}" if d else ""


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (model, source, code) -> n
        # (model, source) -> per-bucket counts (not cumulative: one increment per request; the exposition sums
        # them) + [sum, count]
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.loads: dict[tuple[str, str], int] = defaultdict(int)  # (model, result) -> n
        self.unloads: dict[tuple[str, str], int] = defaultdict(int)  # (model, reason) -> n
        self.swaps = 0
        self.load_seconds: dict[str, float] = {}
        self.states: dict[str, int] = defaultdict(int)  # model state -> how many models are in it
        # (model, engine, reason) -> n: the replica each request of a replicated model went to, and why. Bounded:
        # models the gateway serves, engines it started (at most max_replicas per model), balance's five reasons
        self.choices: dict[tuple[str, str, str], int] = defaultdict(int)

    def state(self, model: str, old: str | None, new: str | None) -> None:
        """A model changed state (machine.Scheduler._to): the models-by-state gauge."""
        if old is not None:
            self.states[old] -= 1
        if new is not None:
            self.states[new] += 1

    def request(self, model: str, source: str, code: int, seconds: float) -> None:
        self.requests[(model, source, str(code))] += 1
        h = self.latency.get((model, source))
        if h is None:
            h = self.latency[(model, source)] = [0.0] * (len(BUCKETS) + 2)
        i = bisect_left(BUCKETS, seconds)  # the first bucket with seconds <= its bound (len(BUCKETS): +Inf only)
        if i < len(BUCKETS):
            h[i] += 1
        h[-2] += seconds
        h[-1] += 1

    def choice(self, model: str, engine: str, reason: str) -> None:
        self.choices[(model, engine, reason)] += 1

    def load(self, model: str, ok: bool, seconds: float | None = None) -> None:
        self.loads[(model, "ok" if ok else "failed")] += 1
        if ok and seconds is not None:
            self.load_seconds[model] = seconds

    def unload(self, model: str, reason: str) -> None:
        self.unloads[(model, reason)] += 1
        if reason in ("evicted", "slept"):
            self.swaps += 1

    def render(self, engines: list[Any], queued: int) -> str:
        out = ["# HELP sage_llm_gateway_requests_total Requests answered by the gateway.",
               "# TYPE sage_llm_gateway_requests_total counter"]
        for (model, source, code), n in sorted(self.requests.items()):
            out.append(f"sage_llm_gateway_requests_total{_labels({'model': model, 'source': source, 'code': code})}"
                       f" {n}")
        out += ["# HELP sage_llm_gateway_request_duration_seconds Time from request to the end of the answer.",
                "# TYPE sage_llm_gateway_request_duration_seconds histogram"]
        for (model, source), h in sorted(self.latency.items()):
            lab = {"model": model, "source": source}
            below = 0
            for i, b in enumerate(BUCKETS):
                below += int(h[i])
                out.append(f"sage_llm_gateway_request_duration_seconds_bucket{_labels({**lab, 'le': str(b)})} "
                           f"{below}")
            out.append(f"sage_llm_gateway_request_duration_seconds_bucket{_labels({**lab, 'le': '+Inf'})} "
                       f"{int(h[-1])}")
            out.append(f"sage_llm_gateway_request_duration_seconds_sum{_labels(lab)} {h[-2]:.6f}")
            out.append(f"sage_llm_gateway_request_duration_seconds_count{_labels(lab)} {int(h[-1])}")
        out += ["# HELP sage_llm_gateway_engine_loads_total Engine loads started by the gateway.",
                "# TYPE sage_llm_gateway_engine_loads_total counter"]
        for (model, result), n in sorted(self.loads.items()):
            out.append(f"sage_llm_gateway_engine_loads_total{_labels({'model': model, 'result': result})} {n}")
        out += ["# HELP sage_llm_gateway_engine_unloads_total Engines stopped or put to sleep by the gateway.",
                "# TYPE sage_llm_gateway_engine_unloads_total counter"]
        for (model, reason), n in sorted(self.unloads.items()):
            out.append(f"sage_llm_gateway_engine_unloads_total{_labels({'model': model, 'reason': reason})} {n}")
        out += ["# HELP sage_llm_gateway_swaps_total Engines unloaded to make room for another model.",
                "# TYPE sage_llm_gateway_swaps_total counter", f"sage_llm_gateway_swaps_total {self.swaps}",
                "# HELP sage_llm_gateway_load_seconds Duration of the last successful load per model.",
                "# TYPE sage_llm_gateway_load_seconds gauge"]
        for model, s in sorted(self.load_seconds.items()):
            out.append(f"sage_llm_gateway_load_seconds{_labels({'model': model})} {s:.3f}")
        out += ["# HELP sage_llm_gateway_queued_requests Requests waiting for a model to load.",
                "# TYPE sage_llm_gateway_queued_requests gauge", f"sage_llm_gateway_queued_requests {queued}",
                "# HELP sage_llm_gateway_models Models the gateway knows, by lifecycle state.",
                "# TYPE sage_llm_gateway_models gauge"]
        for st, n in sorted(self.states.items()):
            if st != "gone":
                out.append(f"sage_llm_gateway_models{_labels({'state': st})} {n}")
        out += ["# HELP sage_llm_gateway_replica_choices_total Requests of replicated models by the replica chosen "
                "and why (affinity, spill, least, only, load, retry).",
                "# TYPE sage_llm_gateway_replica_choices_total counter"]
        for (model, engine, reason), n in sorted(self.choices.items()):
            out.append(f"sage_llm_gateway_replica_choices_total"
                       f"{_labels({'model': model, 'engine': engine, 'reason': reason})} {n}")
        out += ["# HELP sage_llm_gateway_engine_gpu_memory_bytes GPU memory held by each engine's process tree.",
                "# TYPE sage_llm_gateway_engine_gpu_memory_bytes gauge"]
        for e in engines:
            if e.gpu_memory_bytes is not None:
                out.append(f"sage_llm_gateway_engine_gpu_memory_bytes"
                           f"{_labels({'engine': e.name, 'model': e.served or e.model or ''})} {e.gpu_memory_bytes}")
        out += ["# HELP sage_llm_gateway_engine_up Engines the gateway routes to, by state.",
                "# TYPE sage_llm_gateway_engine_up gauge"]
        for e in engines:
            out.append(f"sage_llm_gateway_engine_up{_labels({'engine': e.name, 'state': e.state})} 1")
        return "\n".join(out) + "\n"
