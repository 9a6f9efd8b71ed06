"""Failure diagnosis from an engine's log: one line naming the cause, and the next command to try."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Diagnosis:
    cause: str  # short class id, e.g. "port_in_use"
    message: str  # one line
    hint: str | None = None


CLEAN_SHUTDOWN = re.compile(r"\[shutdown\]|Shutting down FastAPI HTTP server|Application shutdown complete")


def diagnose(lines: list[str], context: dict | None = None) -> Diagnosis | None:
    """The most specific cause found in the log lines, or None."""
    ctx = context or {}
    text = "\n".join(lines)
    port = ctx.get("port")
    if "Address already in use" in text:
        return Diagnosis("port_in_use", f"port {port or ''} is already in use".replace("  ", " "),
                         "choose another --port, or find the owner with `ss -ltnp`")
    if re.search(r"current platform \w+ does not support ray", text):
        return Diagnosis("ray_unsupported_platform",
                         "vLLM's CPU build cannot run on Ray (\"current platform cpu does not support ray\"): "
                         "Ray serving needs GPU nodes",
                         "drop --ray-address to serve on this machine's CPU, or use a Ray cluster of GPU nodes")
    m = re.search(r"Unknown quantization method: ([^\n.]+)", text)
    if m:
        return Diagnosis("unknown_quantization", f"unknown quantization method: {m.group(1).strip()}",
                         "drop --quantization (vLLM reads it from the model) or pick a valid method")
    if "Failed to infer device type" in text:
        return Diagnosis("no_device", "vLLM found no usable device (Failed to infer device type)",
                         "check the NVIDIA driver, or run `sage llm engine install --cpu`")
    if "Available memory on node" in text and "less than desired" in text:
        return Diagnosis("cpu_kv_space", "not enough CPU memory for the KV cache (VLLM_CPU_KVCACHE_SPACE unset)",
                         "set VLLM_CPU_KVCACHE_SPACE=1 (GiB) and start again")
    if re.search(r"Name or service not known|Temporary failure in name resolution|ConnectError|"
                 r"We couldn't connect to", text):
        return Diagnosis("hub_unreachable", "the Hugging Face hub is unreachable",
                         "if the model is cached, start again with HF_HUB_OFFLINE=1")
    for line in reversed(lines):
        if re.search(r"\b(Error|Exception)\b:", line) and "EngineDeadError" not in line:
            return Diagnosis("engine_error", line.strip()[-300:], None)
    return None


def is_clean_shutdown(lines: list[str]) -> bool:
    return any(CLEAN_SHUTDOWN.search(ln) for ln in lines)
