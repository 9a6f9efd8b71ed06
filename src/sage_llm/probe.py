"""Fast HTTP probes of vLLM's `/health` and `/v1/models` with the standard library (no httpx on the status path).

Each probe has a hard time budget, and many engines are probed in parallel threads, so a hung engine costs at most
its own budget and never slows the others.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Probe:
    host: str
    port: int
    reachable: bool = False  # a TCP connection was accepted
    refused: bool = False  # nothing listening
    health: int | None = None  # /health status code
    models: list[dict[str, Any]] = field(default_factory=list)
    models_status: int | None = None
    error: str | None = None
    elapsed_s: float = 0.0

    @property
    def model_ids(self) -> list[str]:
        return [str(m.get("id")) for m in self.models if isinstance(m, dict)]

    @property
    def owned_by_vllm(self) -> bool:
        return any(isinstance(m, dict) and m.get("owned_by") == "vllm" for m in self.models)


def _get(host: str, port: int, path: str, timeout: float, headers: dict[str, str] | None = None
         ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host.strip("[]"), port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(1 << 20)
    finally:
        conn.close()


def probe(host: str, port: int, timeout: float = 0.6, api_key: str | None = None, want_models: bool = True
          ) -> Probe:
    """GET /health then /v1/models, each within `timeout` seconds."""
    started = time.monotonic()
    result = Probe(host, port)
    try:
        result.health, _ = _get(host, port, "/health", timeout)
        result.reachable = True
        if want_models and result.health == 200:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
            status, body = _get(host, port, "/v1/models", timeout, headers)
            result.models_status = status
            if status == 200:
                data = json.loads(body or b"{}")
                models = data.get("data") if isinstance(data, dict) else None
                result.models = [m for m in (models or []) if isinstance(m, dict)]
    except ConnectionRefusedError:
        result.refused = True
    except TimeoutError:
        result.reachable = result.reachable or True
        result.error = f"no answer from {host}:{port} within {timeout:g} s"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.elapsed_s = time.monotonic() - started
    return result


def probe_many(targets: list[tuple[str, int, str | None]], timeout: float = 0.6) -> list[Probe]:
    """Probe (host, port, api_key) targets in parallel; results in the same order."""
    if not targets:
        return []
    if len(targets) == 1:
        h, p, k = targets[0]
        return [probe(h, p, timeout, k)]
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        return list(pool.map(lambda t: probe(t[0], t[1], timeout, t[2]), targets))
