"""The detached gateway's record, `gateway.json` in the state directory, as `status` shows it. Stdlib and our lower
layers only: `status --json` reads it and must not import the gateway's HTTP stack (gateway/daemon.py writes it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any


RECORD = "gateway.json"


def record_path(root: Path | None = None) -> Path:
    from sage_llm.core import paths

    return (root or paths.home()) / RECORD


def load_record(root: Path | None = None) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def alive(rec: dict[str, Any]) -> bool:
    from sage_llm.engine import process

    return process.leader(rec.get("pid"), rec.get("create_time")) is not None


def _health_tls(host: str, port: int, timeout: float, headers: dict[str, str]) -> int | None:
    """GET /health over HTTPS (--tls-cert): is our own process up, not who it is, so the certificate (often
    self-signed) is not verified."""
    import http.client
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", "/health", headers=headers)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def health(host: str, port: int, timeout: float = 1.0) -> int | None:
    """GET /health of the gateway on the probes' raw-socket client (with its key when it has one)."""
    import time

    from sage_llm.core.addresses import reachable_host
    from sage_llm.observe.probe import http_get

    headers = {}
    rec = load_record()
    key_env = (rec.get("options") or {}).get("api_key_env") if rec else None
    if key_env and os.environ.get(key_env):
        headers["Authorization"] = f"Bearer {os.environ[key_env]}"
    if rec and (rec.get("options") or {}).get("tls_cert"):
        return _health_tls(reachable_host(host), port, timeout, headers)
    try:
        status, _body = http_get(reachable_host(host), port, "/health", time.monotonic() + timeout, headers)
    except (OSError, ValueError):  # refused, timeout, or not HTTP
        return None
    return status


def record_status(root: Path | None = None, probe: bool = False, nodes: bool = False) -> dict[str, Any] | None:
    """The gateway as `status --json` shows it: None when no gateway is recorded. With `nodes`, a running gateway
    with a cluster also gets `cluster`: its nodes and their free resources as Ray sees them (engine/cluster.py
    nodes_view: Ray is imported then, and only then)."""
    rec = load_record(root)
    if rec is None:
        return None
    running = alive(rec)
    out = {"running": running, "pid": rec.get("pid"), "host": rec.get("host"), "port": rec.get("port"),
           "url": rec.get("url"), "started_at": rec.get("started_at"), "log_file": rec.get("log_file")}
    if probe and running:
        out["healthy"] = health(rec.get("host", "127.0.0.1"), int(rec.get("port") or 0)) == 200
    address = (rec.get("options") or {}).get("cluster")
    if nodes and running and address:
        from sage_llm.engine import cluster

        out["cluster"] = cluster.nodes_view(str(address))
    return out
