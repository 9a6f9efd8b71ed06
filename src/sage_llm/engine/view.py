"""What an engine looks like to `status`: the typed view, and the rules that turn a probe into a state."""

from __future__ import annotations

from sage_llm.core.records import Record, field
from sage_llm.core.state import EngineRecord

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any



class EngineView(Record):
    name: str | None
    managed: bool
    state: str  # starting | ready | unhealthy | failed | stopped
    model: str | None = None
    served_model_name: str | None = None
    host: str | None = None
    port: int | None = None
    base_url: str | None = None
    pid: int | None = None
    started_at: str | None = None
    uptime_s: float | None = None
    log_file: str | None = None
    error: str | None = None
    stage: str | None = None
    progress: float | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)
    gpu_memory_bytes: int | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    max_model_len: int | None = None
    dtype: str | None = None  # what the engine computes in (its log), else the --dtype it was started with
    settings: dict[str, Any] = field(default_factory=dict)
    record: EngineRecord | None = None
    ray: dict[str, Any] | None = None  # engines on a Ray cluster: address, nodes, workers (engine/ray_cluster.py)
    cluster: dict[str, Any] | None = None  # whole engines placed on a Ray cluster (engine/cluster.py)
    key_seen: bool | None = None  # its /v1/models answered 401 without a key (True) or 200 (False) when probed

    def auth(self) -> tuple[str | None, str | None]:
        """(auth, key_source): does the engine need an API key ("key"/"none"; None: unknown), and where sage-llm
        finds it: "gateway" (derived from this user's gateway secret), "env" (the variable named at its start)."""
        from sage_llm.core import engine_keys

        var = self.record.api_key_env if self.record is not None else None
        if var:
            return "key", "gateway" if engine_keys.is_gateway_key(var) else "env"
        if self.key_seen is not None:
            return ("key" if self.key_seen else "none"), None
        return ("none" if self.managed else None), None

    @property
    def node(self) -> str | None:
        """The Ray node an engine placed on a cluster runs on (its address), None for an engine of this machine."""
        return (self.cluster or {}).get("node_address") or (self.cluster or {}).get("node_ip") or None

    def to_json(self) -> dict[str, Any]:
        keys = ("name", "managed", "state", "model", "served_model_name", "host", "port", "base_url", "pid",
                "started_at", "uptime_s", "log_file", "error", "stage", "progress", "gpu_memory_bytes", "gpus",
                "max_model_len", "dtype", "processes")
        doc = {k: getattr(self, k) for k in keys}
        doc["auth"], doc["key_source"] = self.auth()
        doc["node"] = self.node
        if self.ray is not None:
            doc["ray"] = self.ray
        if self.cluster is not None:
            doc["cluster"] = self.cluster
        return doc


def apply_probe(view: EngineView, served: str | None, p: Any, recorded_state: str) -> None:
    """Set the view's state from a probe: ready only when /health is 200 and /v1/models lists the served name."""
    if p.models_status in (200, 401):
        view.key_seen = p.models_status == 401
    if p.health == 200 and (served is None or served in p.model_ids or p.models_status == 401):
        view.state = "ready"
        for m in p.models:
            if m.get("id") == served and isinstance(m.get("max_model_len"), int):
                view.max_model_len = m["max_model_len"]
        if served is None and p.models:
            view.served_model_name = p.model_ids[0]
    elif p.refused:
        view.state = "starting"
    elif p.health == 200:
        view.state = "unhealthy"
        view.error = f"/v1/models does not list {served!r} (serves {', '.join(p.model_ids) or 'nothing'})"
    elif p.health is not None:
        view.state = "unhealthy"
        view.error = f"/health answered {p.health}" + (" (engine dead)" if p.health == 503 else "")
    else:
        view.state = "unhealthy"
        view.error = p.error or "no answer"


def human_uptime(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def local_engine(views: list[EngineView], local_port: int) -> dict[str, Any]:
    """The seed's LocalEngineStatus: the ready engine Studio should use."""
    ready = [v for v in views if v.state == "ready"]
    pick = next((v for v in ready if v.port == local_port), None) or (ready[0] if ready else None)
    if pick is None:
        return {"running": False, "port": None, "model": None, "pid": None, "gpu_memory_usage": None, "uptime": None}
    gb = round(pick.gpu_memory_bytes / 1024**3, 2) if pick.gpu_memory_bytes is not None else None
    return {"running": True, "port": pick.port, "model": pick.served_model_name or pick.model, "pid": pick.pid,
            "gpu_memory_usage": gb, "uptime": human_uptime(pick.uptime_s)}


