"""CPU engine dtype (issue 12): the answer and tokens/s of the demo's model per --dtype and per vLLM CPU kernel path.

For each configuration: `vllm serve MODEL --enforce-eager --max-model-len 2048 [--dtype D]` (the engine venv's real
console script), one greedy "What is the capital of France?" (max_tokens 40), then three non-streamed requests of
exactly 128 tokens (ignore_eos + min_tokens): tokens/s is their median. The kernel library vLLM loaded (`_C` for
AVX512-BF16, `_C_AVX512`, `_C_AVX2`) is read from the engine processes' /proc/PID/maps, the dtype from vLLM's own
"Initializing a V1 LLM engine ... dtype=torch.X" line.

Other code paths than this CPU's own are forced by hiding features from `torch.cpu.get_capabilities()`, which is what
vLLM asks (platforms/cpu.py import_kernels, attention and GEMM dispatch): a sitecustomize.py on PYTHONPATH, written
to a temporary directory, patches it in every process of the engine. `ATEN_CPU_CAPABILITY=avx2` goes with the AVX2
path for torch's own kernels (alone it does not change vLLM's choice). AMX cannot be forced on a CPU without it.

Usage (the model as `make demo` imports it into .demo/hub):
    .venv/bin/python bench/bench_cpu_dtype.py --engine-dir .engines/cpu --hub .demo/hub \\
        [--model sage-demo/SmolLM2-135M-Instruct] [--paths native,avx2] [--dtypes auto,float32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

SITECUSTOMIZE = '''\
import os
_hide = [h for h in os.environ.get("BENCH_HIDE_CPU", "").split(",") if h]
if _hide:
    from types import MappingProxyType
    import torch.cpu as _c
    _orig = _c.get_capabilities
    def get_capabilities():
        caps = dict(_orig())
        for k in caps:
            if any(k.startswith(h) for h in _hide):
                caps[k] = False
        return MappingProxyType(caps)
    _c.get_capabilities = get_capabilities
'''
# path name -> (capability prefixes to hide, extra environment)
PATHS = {
    "native": ("", {}),
    "avx512-no-bf16": ("avx512_bf16,amx", {}),
    "avx2": ("avx512,amx", {"ATEN_CPU_CAPABILITY": "avx2"}),
}
QUESTION = "What is the capital of France?"
DTYPE_LINE = re.compile(r"\bdtype=torch\.(\w+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(leader: int) -> list[int]:
    out = subprocess.run(["pgrep", "-s", str(leader)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kernels(leader: int) -> list[str]:
    found: set[str] = set()
    for pid in session_pids(leader):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        found |= {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/vllm/_C" in line}
    return sorted(found)


def run_one(args: argparse.Namespace, path: str, dtype: str, shim: Path, log_dir: Path) -> dict:
    hide, extra_env = PATHS[path]
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(args.hub),
               VLLM_NO_USAGE_STATS="1", PYTHONPATH=str(shim), BENCH_HIDE_CPU=hide, **extra_env)
    argv = [str(args.engine_dir / "bin" / "vllm"), "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--max-model-len", "2048"] + ([] if dtype == "auto" else ["--dtype", dtype])
    log = log_dir / f"{path}-{dtype}.log"
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                return {"path": path, "dtype_arg": dtype, "error": f"engine exited; see {log}"}
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready = time.monotonic() - t0
        body = {"model": args.model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0}
        answer = httpx.post(base + "/v1/chat/completions", json={**body, "max_tokens": 40},
                            timeout=300).json()["choices"][0]["message"]["content"]
        rates = []
        for _ in range(args.runs):
            t = time.monotonic()
            usage = httpx.post(base + "/v1/chat/completions", timeout=600, json={
                **body, "max_tokens": 128, "min_tokens": 128, "ignore_eos": True}).json()["usage"]
            rates.append(usage["completion_tokens"] / (time.monotonic() - t))
        m = next((DTYPE_LINE.search(line) for line in log.read_text().splitlines()
                  if "Initializing a V1 LLM engine" in line), None)
        return {"path": path, "dtype_arg": dtype, "engine_dtype": m.group(1) if m else None,
                "kernels": kernels(proc.pid), "ready_s": round(ready, 1), "answer": answer,
                "tokens_per_s": [round(r, 1) for r in rates], "median_tokens_per_s": round(statistics.median(rates), 1),
                "load1": round(os.getloadavg()[0], 1)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", type=Path, required=True, help="the CPU engine venv (has bin/vllm)")
    ap.add_argument("--hub", type=Path, required=True, help="HF hub cache holding the model")
    ap.add_argument("--model", default="sage-demo/SmolLM2-135M-Instruct")
    ap.add_argument("--paths", default="native,avx2", help="comma list of: " + ", ".join(PATHS))
    ap.add_argument("--dtypes", default="auto,float32", help="comma list of --dtype values (auto: none passed)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "bench-cpu-dtype",
                    help="where the engines' logs go")
    args = ap.parse_args()
    args.engine_dir, args.hub = args.engine_dir.resolve(), args.hub.resolve()
    args.logs.mkdir(parents=True, exist_ok=True)
    print(f"# {machine()}; engine logs in {args.logs}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-dtype-") as tmp:
        shim = Path(tmp)
        (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for path in args.paths.split(","):
            for dtype in args.dtypes.split(","):
                print(json.dumps(run_one(args, path, dtype, shim, args.logs)), flush=True)


if __name__ == "__main__":
    main()
