"""Failure diagnosis from an engine's log: one line naming the cause, and the next command to try.

Each class is matched on the text vLLM (0.32 CPU, 0.33 GPU) or huggingface_hub really prints; see
docs/troubleshooting.md for one entry per class and tests/unit/test_diagnose.py for the log text behind each.
A clean shutdown (SIGTERM from `stop`) logs `EngineDeadError` from the output handler: that is not a failure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class Diagnosis:
    cause: str  # short class id, e.g. "port_in_use"
    message: str  # one line
    hint: str | None = None  # the next command to try
    evidence: str | None = None  # the log line it was read from

    def to_json(self) -> dict[str, Any]:
        return {"cause": self.cause, "message": self.message, "hint": self.hint, "evidence": self.evidence}


CAUSES = (
    "port_in_use", "ray_unsupported_platform", "unknown_quantization", "no_device", "gpu_memory_utilization",
    "cpu_kv_space", "max_model_len", "kv_cache_memory", "cuda_oom", "remote_code", "hub_auth", "model_not_found",
    "hub_unreachable", "not_enough_gpus", "engine_timeout", "terminated", "engine_core", "engine_error",
)

CLEAN_SHUTDOWN = re.compile(r"\[shutdown\]|Shutting down FastAPI HTTP server|Application shutdown complete")
_PREFIX = re.compile(r"^\S*\((?:[A-Za-z_0-9-]+) pid=\d+\) [A-Z]+ \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]+\] ?")
_EXC = re.compile(r"^(?:[\w.]+\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")
_WRAPPERS = ("Engine core initialization failed", "WorkerProc initialization failed", "EngineCore failed to start",
             "EngineCore encountered", "See stack trace", "See root cause above")

_FREE_GPU = re.compile(r"Free memory on device (\S+) \(([\d.]+)/([\d.]+) GiB\) on startup is less than desired GPU "
                       r"memory utilization \(([\d.]+), ([\d.]+) GiB\)")
_FREE_CPU = re.compile(r"Available memory on node (\d+) \(([\d.]+)/([\d.]+) GiB\) on startup is less than desired CPU "
                       r"memory utilization \(([\d.]+), ([\d.]+) GiB\)")
_MAX_LEN_EST = re.compile(r"max seq len \((\d+)\).*?estimated maximum model length is (\d+)", re.S)
_MAX_LEN_DERIVED = re.compile(r"User-specified max_model_len \((\d+)\) is greater than the derived max_model_len "
                              r"\(\w+=(\d+)")
_QUANT = re.compile(r"Unknown quantization method: ([^\s.]+)\.?(?: Must be one of \[([^\]]*)\])?")
_WORLD = re.compile(r"World size \((\d+)\) is larger than the number of available GPUs \((\d+)\)")
_REPO_URL = re.compile(r"huggingface\.co/(?:api/models/)?([\w.-]+/[\w.-]+)")


def _msg(line: str) -> str:
    """A log line without vLLM's `(Proc pid=N) LEVEL MM-DD HH:MM:SS [file.py:N] ` prefix."""
    return _PREFIX.sub("", line).strip()


def _find(lines: list[str], pattern: re.Pattern[str] | str) -> tuple[re.Match[str] | None, str | None]:
    """The first match of `pattern` in the lines (joined, so a message split over lines still matches)."""
    for ln in lines:
        m = pattern.search(ln) if isinstance(pattern, re.Pattern) else None
        if m:
            return m, _msg(ln)
    return None, None


def _has(lines: list[str], *needles: str) -> str | None:
    for ln in lines:
        for n in needles:
            if n in ln:
                return _msg(ln)
    return None


def root_cause(lines: list[str]) -> str | None:
    """The exception vLLM printed as the root cause: the first `XxxError: ...` that is not a wrapper, not the
    `EngineDeadError` of a shutdown, and not part of a warning."""
    first: str | None = None
    for i, ln in enumerate(lines):
        m = _EXC.match(_msg(ln))
        if not m or m.group(1) == "EngineDeadError" or "Warning" in m.group(1):
            continue
        text = _msg(ln)
        if any(w in text for w in _WRAPPERS):
            first = first or text
            continue
        if "validation error for" in text:  # pydantic puts the reason on the next line: "  Value error, <reason>"
            for nxt in lines[i + 1:i + 4]:
                detail = _msg(nxt)
                if detail.startswith(("Value error, ", "Assertion failed, ")):
                    reason = detail.split(", ", 1)[1].split(" [type=")[0]
                    return f"{m.group(1)}: {reason}"[:300]
        return text[:300]
    return first[:300] if first else None


def _gpu_util_hint(free: float, total: float, asked: float) -> float:
    """A --gpu-memory-utilization that fits the free memory, with a small margin, rounded down to 0.01."""
    frac = free / total - 0.02 if total else 0.0
    return max(0.05, math.floor(min(frac, asked - 0.01) * 100) / 100)


def _round_len(n: int) -> int:
    """A tidy --max-model-len at or below n (a multiple of 1024 above 4096, else of 256)."""
    step = 1024 if n >= 4096 else 256
    return max(step, (n // step) * step) if n >= step else n


def diagnose(lines: list[str], context: dict[str, Any] | None = None) -> Diagnosis | None:
    """The most specific cause found in the log lines, or None (also for a clean shutdown).

    context (all optional): port, model, cached (model complete in the HF cache), gpu_memory_utilization,
    other_engines (names of other live engines, listed when memory is short).
    """
    ctx = context or {}
    port = ctx.get("port")
    model = ctx.get("model") or "the model"
    others = [o for o in ctx.get("other_engines") or [] if o]
    others_txt = f"; other engines running: {', '.join(others)}" if others else ""
    logs_cmd = f"sage-llm logs {ctx.get('name') or 'NAME'} -n 80"

    ev = _has(lines, "Address already in use")
    if ev:
        return Diagnosis("port_in_use", f"port {port} is already in use" if port else "the port is already in use",
                         "choose another --port (or leave it out to take the next free one); find the owner with "
                         f"`ss -ltnp 'sport = :{port}'`" if port else "choose another --port", ev)

    m, ev = _find(lines, re.compile(r"current platform \w+ does not support ray"))
    if m:
        return Diagnosis("ray_unsupported_platform",
                         "vLLM's CPU build cannot run on Ray (\"current platform cpu does not support ray\"): "
                         "Ray serving needs GPU nodes",
                         "drop --ray-address to serve on this machine's CPU, or use a Ray cluster of GPU nodes", ev)

    m, ev = _find(lines, _QUANT)
    if m:
        valid = [v.strip().strip("'\"") for v in (m.group(2) or "").split(",") if v.strip()]
        shown = ", ".join(valid[:14]) + (", ..." if len(valid) > 14 else "")
        return Diagnosis("unknown_quantization", f"unknown quantization method {m.group(1)!r}"
                         + (f"; valid: {shown}" if valid else ""),
                         "drop --quantization (vLLM reads it from the model's config) or pass one of the valid "
                         "methods, e.g. -q awq", ev)

    ev = _has(lines, "Failed to infer device type")
    if ev:
        return Diagnosis("no_device", "vLLM found no usable device (\"Failed to infer device type\"): no GPU driver "
                         "visible and this is not a CPU build of vLLM",
                         "check `nvidia-smi` (driver, CUDA_VISIBLE_DEVICES), or on a machine without a GPU run "
                         "`sage-llm engine install --cpu`", ev)

    m, ev = _find(lines, _FREE_GPU)
    if m:
        dev, free, total, asked, asked_gib = m.group(1), *map(float, m.groups()[1:])
        suggest = _gpu_util_hint(free, total, asked)
        return Diagnosis("gpu_memory_utilization",
                         f"only {free:.2f} of {total:.2f} GiB free on {dev}, less than --gpu-memory-utilization "
                         f"{asked:g} asks for ({asked_gib:.2f} GiB){others_txt}",
                         f"start again with --gpu-memory-utilization {suggest:.2f}, or stop another engine on that "
                         "GPU (`sage-llm status`)", ev)

    m, ev = _find(lines, _FREE_CPU)
    if m:
        node, free, total = m.group(1), float(m.group(2)), float(m.group(3))
        return Diagnosis("cpu_kv_space",
                         f"not enough CPU memory for vLLM's default KV cache sizing ({free:.2f} of {total:.2f} GiB "
                         f"free on NUMA node {node}; VLLM_CPU_KVCACHE_SPACE not set)",
                         "set VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache) and start again", ev)

    joined = "\n".join(_msg(ln) for ln in lines if "max seq len" in ln or "estimated maximum model length" in ln)
    m = _MAX_LEN_EST.search(joined)
    if m:
        want, est = int(m.group(1)), int(m.group(2))
        return Diagnosis("max_model_len",
                         f"the KV cache cannot hold one request of --max-model-len {want}: vLLM estimates the "
                         f"maximum length that fits as {est}",
                         f"start again with --max-model-len {_round_len(est)} (or raise --gpu-memory-utilization)",
                         joined.splitlines()[0][:300])
    m, ev = _find(lines, _MAX_LEN_DERIVED)
    if m:
        want, derived = int(m.group(1)), int(m.group(2))
        return Diagnosis("max_model_len", f"--max-model-len {want} is longer than the model supports ({derived})",
                         f"start again with --max-model-len {derived} or less", ev)

    ev = _has(lines, "No available memory for the cache blocks")
    if ev:
        return Diagnosis("kv_cache_memory",
                         f"no memory left for the KV cache after loading the weights{others_txt}",
                         "raise --gpu-memory-utilization, lower --max-model-len, or stop other engines on that GPU",
                         ev)

    ev = _has(lines, "CUDA out of memory", "OutOfMemoryError", "Failed to load model - not enough GPU memory")
    if ev:
        return Diagnosis("cuda_oom", f"CUDA out of memory while loading {model}{others_txt}",
                         "stop other engines on that GPU, use more GPUs (-tp 2), a quantized model (e.g. an AWQ "
                         "variant), or a lower --gpu-memory-utilization if other processes share the GPU", ev)

    ev = _has(lines, "contains custom code which must be executed", "trust_remote_code=True")
    if ev:
        return Diagnosis("remote_code", f"{model} needs its own Python code from the repository to load",
                         "if you trust that repository, start again with --trust-remote-code", ev)

    ev = _has(lines, "GatedRepoError", "Cannot access gated repo", "awaiting a review", "401 Client Error",
              "403 Client Error", "Invalid credentials in Authorization header", "Invalid user token",
              "LocalTokenNotFoundError")
    if ev:
        gated = "gated" in ev.lower() or "403" in ev or "review" in ev
        what = ("is gated: your Hugging Face account must accept its licence" if gated
                else "needs a valid Hugging Face token (401 Unauthorized)")
        return Diagnosis("hub_auth", f"{model} {what}",
                         ("accept the terms on the model page, then " if gated else "")
                         + "set HF_TOKEN=hf_... or run `hf auth login`, and start again", ev)

    ev = _has(lines, "outgoing traffic has been disabled", "LocalEntryNotFoundError")
    if ev:
        return Diagnosis("model_not_found", f"{model} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                         "forbids downloading it",
                         f"download it first (`hf download {ctx.get('model') or 'ORG/NAME'}`), or start without "
                         "HF_HUB_OFFLINE=1", ev)

    ev = _has(lines, "RepositoryNotFoundError", "Repository Not Found", "404 Client Error",
              "is not a local folder and is not a valid model identifier", "Invalid repository ID or local directory",
              "does not appear to have a file named config.json", "does not exist or is not accessible",
              "Cannot find model module")
    if ev:
        local = str(ctx.get("model", "")).startswith(("/", ".", "~"))
        return Diagnosis("model_not_found",
                         f"model {model} not found" + (" (no such local directory with a config.json)" if local
                                                       else " on the Hugging Face hub (or it is private)"),
                         "check the spelling (`sage-llm models` lists the local ones); for a private repo set "
                         "HF_TOKEN or run `hf auth login`", ev)

    ev = _has(lines, "Name or service not known", "Temporary failure in name resolution", "We couldn't connect to",
              "Failed to resolve 'huggingface.co'", "Network is unreachable", "ConnectError", "ConnectTimeout")
    if ev:
        cached = ctx.get("cached")
        hint = ("the model is in the local cache: start again with HF_HUB_OFFLINE=1" if cached
                else "check the network or proxy (HTTPS_PROXY); once the model is cached, HF_HUB_OFFLINE=1 avoids "
                     "the hub")
        return Diagnosis("hub_unreachable", "the Hugging Face hub is unreachable", hint, ev)

    m, ev = _find(lines, _WORLD)
    if m:
        return Diagnosis("not_enough_gpus", f"{m.group(1)} GPUs requested (tensor x pipeline parallel) but only "
                         f"{m.group(2)} available", f"start again with -tp {m.group(2)} (or fewer)", ev)

    ev = _has(lines, "Timed out waiting for engine core processes to start")
    if ev:
        return Diagnosis("engine_timeout", "vLLM's engine core did not start in time (slow weight loading or download)",
                         "raise VLLM_ENGINE_READY_TIMEOUT_S (default 600), e.g. `VLLM_ENGINE_READY_TIMEOUT_S=1800 "
                         "sage-llm start ...`", ev)

    ev = _has(lines, "EngineCore: trigger received signal=SIGTERM", "KeyboardInterrupt: terminated")
    if ev and not _has(lines, "Application startup complete"):
        return Diagnosis("terminated", "the engine was stopped (SIGTERM) before it was ready",
                         "start it again; give a slow first start more time with --timeout", ev)

    # argparse refused the command line (`vllm: error: unrecognized arguments: --x`, e.g. a typo after `--`)
    m = next((re.search(r"^vllm[\w ]*: error: (.+)$", ln.strip()) for ln in reversed(lines)
              if re.search(r"^vllm[\w ]*: error: ", ln.strip())), None)
    if m:
        return Diagnosis("engine_error", f"vLLM rejected its command line: {m.group(1)}",
                         "check the options after `--` (see `vllm serve --help`)", m.group(0))

    wrapper = _has(lines, "Engine core initialization failed", "EngineCore failed to start",
                   "EngineCore encountered a fatal error", "WorkerProc initialization failed")
    cause = root_cause(lines)
    if wrapper:
        rc = cause if cause and not any(w in cause for w in _WRAPPERS) else None
        return Diagnosis("engine_core", "vLLM's engine core failed to start" + (f": {rc}" if rc else ""),
                         f"see the lines above the failure with `{logs_cmd}`", rc or wrapper)
    if cause and not is_clean_shutdown(lines):
        return Diagnosis("engine_error", cause, f"see `{logs_cmd}`", cause)
    return None


def is_clean_shutdown(lines: list[str]) -> bool:
    return any(CLEAN_SHUTDOWN.search(ln) for ln in lines)
