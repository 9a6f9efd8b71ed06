"""scripts/gpu_check.py, the one-go check for a lent GPU machine (issue 15), run here against the fake driver
(tests/fakes/fake_gpu.py) and with no driver, plus its evaluations on hand-made inputs (each one can fail)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
FAKE_GPU = ROOT / "tests" / "fakes" / "fake_gpu.py"
GiB, MiB = 1024**3, 1024**2


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check_under_test", SCRIPT)
fake_gpu = _load("fake_gpu_under_test", FAKE_GPU)


def run_check(out: Path, *args: str) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--repeat", "3", "--top-seconds", "3",
                           "--budget", "240", *args], capture_output=True, text=True, timeout=280)
    doc = json.loads((out / "gpu-check.json").read_text())
    return proc.returncode, doc, proc.stdout + proc.stderr


def test_fake_driver_run_passes_every_check(tmp_path: Path) -> None:
    code, doc, output = run_check(tmp_path, "--fake")
    statuses = {c["name"]: c["status"] for c in doc["checks"]}
    assert statuses == dict.fromkeys(gpu_check.CHECKS, "pass"), output
    assert code == 0
    assert doc["mode"] == "fake"
    assert doc["passed"] is True
    checks = {c["name"]: c for c in doc["checks"]}
    # each stand-in engine: 2 GiB + 3 GiB held by its two children, plus a (fake) CUDA context each
    for engine in checks["engine_vram_matches_nvidia_smi"]["values"]["engines"].values():
        assert engine["gpu_memory_bytes"] == 5 * GiB + 2 * fake_gpu.CONTEXT_BYTES == engine["nvidia_smi_bytes"]
        assert len(engine["nvidia_smi_rows_of_tree"]) == 2
    assert checks["auto_placement"]["values"]["expected_index"] == 1  # the fake GPU 1 has more free memory
    assert f"pid {checks['preflight_refuses']['values']['hog_pid']}" in checks["preflight_refuses"]["values"]["stderr"]
    timing = checks["status_json_timing"]["values"]
    assert len(timing["runs_ms"]["driver"]) == len(timing["runs_ms"]["no_driver"]) == 3
    assert checks["top_gpu_rows"]["values"]["cpu_ms_per_frame"] is not None
    assert "H200 (fake)" in (tmp_path / "top-frame.txt").read_text()
    assert "PASS     stop_frees_gpu" in (tmp_path / "gpu-check.txt").read_text()
    record = (tmp_path / "gpu-verified.md").read_text()  # the draft of docs/gpu-verified.md
    assert "**Rehearsal (fake mode), not a real-GPU result.**" in record
    assert all(f"| `{name}` | pass |" in record for name in gpu_check.CHECKS)
    assert "NVML cost" in record


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/dxg")),
                    reason="this machine has an NVIDIA driver")
def test_without_a_gpu_the_gpu_checks_are_skipped(tmp_path: Path) -> None:
    code, doc, output = run_check(tmp_path)
    assert code == 0, output
    assert doc["mode"] == "nogpu"
    statuses = {c["name"]: c["status"] for c in doc["checks"]}
    assert statuses.pop("environment") == "pass"
    assert statuses.pop("stop_leaves_nothing") == "pass"  # the stand-in still starts, shows and stops
    assert set(statuses) == set(gpu_check.CHECKS) - {"environment", "stop_leaves_nothing"}
    assert set(statuses.values()) == {"skipped"}
    assert all(c["summary"].startswith("skipped: no GPU") for c in doc["checks"] if c["status"] == "skipped")


def test_evaluations_fail_on_wrong_figures() -> None:
    engine = {"name": "e", "gpu_memory_bytes": 6 * GiB}
    tree = {10, 11, 12}
    rows = [(11, 2560), (12, 3584), (99, 4000)]  # 99: not the engine's
    ok, values = gpu_check.eval_vram(engine, rows, tree, 5 * GiB)
    assert ok
    assert values["foreign_smi_pids"] == [99]
    assert not gpu_check.eval_vram(engine, [(11, 2560), (12, 3584 + 200)], tree, 5 * GiB)[0]  # 3 % off
    assert not gpu_check.eval_vram(engine, rows, tree, 7 * GiB)[0]  # less than the stand-in allocated
    # other PID namespace: nvidia-smi lists none of the tree, sage reports 0: equal, and still a failure
    assert not gpu_check.eval_vram({"name": "e", "gpu_memory_bytes": 0}, [(5000, 6144)], tree, 0)[0]
    assert not gpu_check.eval_vram({"name": "e", "gpu_memory_bytes": None}, rows, tree, 0)[0]

    good = {"gpu_error": None, "gpus": [{"index": 0, "uuid": "GPU-1", "name": "H200", "memory_total_bytes": 1,
                                         "memory_used_bytes": 1, "memory_free_bytes": 0, "utilization_percent": 0,
                                         "temperature_c": 30, "power_draw_w": 70.0, "power_limit_w": 700.0}]}
    assert gpu_check.eval_gpus(good) == (True, [])
    bad = json.loads(json.dumps(good))
    bad["gpus"][0]["temperature_c"] = None
    assert gpu_check.eval_gpus(bad) == (False, ["GPU 0: temperature_c is null"])
    assert not gpu_check.eval_gpus({"gpu_error": "the NVIDIA driver is not loaded", "gpus": []})[0]

    status = {"engines": [{"port": 8001, "managed": True, "gpu_memory_bytes": 6 * GiB}],
              "local_engine": {"running": True, "port": 8001, "gpu_memory_usage": 6.0}}
    assert gpu_check.eval_local_engine(status, 8001)[0]
    status["local_engine"]["gpu_memory_usage"] = 6.44  # bytes / 1e9 instead of GiB
    assert not gpu_check.eval_local_engine(status, 8001)[0]

    line = ("Error: GPU 0 has 49.0 GiB free of 141.0 GiB, but --gpu-memory-utilization 0.5 needs 70.5 GiB; held by "
            "pid 4242 (80.0 GiB), engine 'gpu-a' (6.0 GiB) (hint: ...)\n")
    assert gpu_check.eval_preflight(1, "", line, 4242, ["gpu-a"]) == (True, [])
    ok, problems = gpu_check.eval_preflight(1, "", line, 4243, ["gpu-a", "gpu-b"])
    assert not ok
    assert len(problems) == 2
    assert not gpu_check.eval_preflight(0, "{}", "", 4242, [])[0]


def test_parsing_nvidia_smi_and_top_frames() -> None:
    assert gpu_check.parse_smi_apps("123, 2560\n456, 3584\n") == [(123, 2560), (456, 3584)]
    assert gpu_check.parse_smi_apps("No running processes found\n") == []
    assert gpu_check.parse_smi_apps("789, [N/A]\n") == [(789, 0)]  # MIG: no per-process figure
    raw = (b"\x1b[?1049h\x1b[Hsage-llm top  10:00:00  old\r\n\x1b[2J\x1b[H\x1b[1msage-llm top  10:00:01\x1b[0m  x\r\n"
           b"GPU  NAME\r\n0    \x1b[32mH200\x1b[0m   \r\n\x1b[?1049l")
    assert gpu_check.last_frame(raw) == "sage-llm top  10:00:01  x\nGPU  NAME\n0    H200\n"


def test_a_stale_carried_package_is_named(tmp_path: Path) -> None:
    copy = tmp_path / "sage_llm"
    shutil.copytree(ROOT / "src" / "sage_llm", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert gpu_check.stale_files(copy) == []
    assert gpu_check.stale_files(ROOT / "src" / "sage_llm") == []
    with open(copy / "observe" / "gpu.py", "a") as fh:
        fh.write("# changed\n")
    (copy / "engine" / "status.py").unlink()
    assert gpu_check.stale_files(copy) == ["engine/status.py", "observe/gpu.py"]


def test_fake_ledger_memory_lives_and_dies_with_its_process(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    gpus = fake_gpu.init_ledger(ledger, 2)
    env = {**os.environ, "FAKE_GPU_LEDGER": str(ledger), "CUDA_VISIBLE_DEVICES": gpus[1]["uuid"]}
    hog = subprocess.Popen([sys.executable, str(FAKE_GPU), "hold", str(3 * GiB)], env=env, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert hog.stdout is not None
        assert hog.stdout.readline().split() == ["HOLDING", "ledger", str(3 * GiB)]
        nv = fake_gpu.ledger_nvml(ledger)
        nv.nvmlInit()
        assert nv.nvmlDeviceGetCount() == 2
        handle = nv.nvmlDeviceGetHandleByIndex(1)
        (proc,) = nv.nvmlDeviceGetComputeRunningProcesses(handle)
        assert (proc.pid, proc.usedGpuMemory) == (hog.pid, 3 * GiB + fake_gpu.CONTEXT_BYTES)
        assert nv.nvmlDeviceGetMemoryInfo(handle).used == gpus[1]["baseline"] + 3 * GiB + fake_gpu.CONTEXT_BYTES
        assert nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(0)) == []
        smi = [sys.executable, str(FAKE_GPU), "nvidia-smi", "--query-compute-apps=pid,used_memory",
               "--format=csv,noheader,nounits"]
        rows = gpu_check.parse_smi_apps(subprocess.run(smi, env=env, capture_output=True, text=True).stdout)
        assert rows == [(hog.pid, (3 * GiB + fake_gpu.CONTEXT_BYTES) // MiB)]
        # the fault knob: nvidia-smi 5 % above NVML, which the comparison must catch
        skewed = subprocess.run(smi, env={**env, "FAKE_GPU_SMI_SKEW": "0.05"}, capture_output=True, text=True)
        engine = {"name": "hog", "gpu_memory_bytes": proc.usedGpuMemory}
        assert gpu_check.eval_vram(engine, rows, {hog.pid}, 3 * GiB)[0]
        assert not gpu_check.eval_vram(engine, gpu_check.parse_smi_apps(skewed.stdout), {hog.pid}, 3 * GiB)[0]
    finally:
        hog.send_signal(signal.SIGKILL)  # no clean-up of its ledger entry: a dead process holds nothing anyway
        hog.wait()
    deadline = time.monotonic() + 5
    while nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(1)) == []
    assert nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(1)).used == gpus[1]["baseline"]


def test_allocate_uses_torch_on_cuda_when_there_is_no_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    cuda = types.SimpleNamespace(is_available=lambda: True, synchronize=lambda: calls.append(("sync",)))
    torch = types.SimpleNamespace(uint8="uint8", cuda=cuda,
                                  empty=lambda n, dtype, device: calls.append((n, dtype, device)) or object())
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.delenv("FAKE_GPU_LEDGER", raising=False)
    try:
        assert fake_gpu.allocate(2 * GiB) == "torch"
        assert calls == [(2 * GiB, "uint8", "cuda"), ("sync",)]
        assert len(fake_gpu._held) == 1  # kept alive
        cuda.is_available = lambda: False
        assert fake_gpu.allocate(GiB) == "none"
    finally:
        fake_gpu.release()
    monkeypatch.setitem(sys.modules, "torch", None)  # not installed
    assert fake_gpu.allocate(GiB) == "none"
