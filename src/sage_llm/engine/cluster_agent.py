"""The node side of cluster engines: a detached, named Ray actor that owns one engine's whole lifecycle on its node.

`sage-llm start MODEL --cluster ADDRESS` (engine/cluster.py) creates one `EngineAgent` per engine, named
`sage-llm-engine:<name>` in the Ray namespace `sage-llm`, asking Ray for the engine's GPUs (`num_gpus` = tensor x
pipeline parallel size) so Ray's scheduler does the placement and never places two engines on the same GPUs. The
agent starts `vllm serve` in its own session with the same argv/environment builders as a local start
(engine/vllm.py), answers readiness, log and stop calls, and stops the engine like a local stop does (SIGTERM the
group, wait for every process of it, SIGKILL, verify, then remove that engine's /dev/shm files and temp directory).

Ray alone does not clean up: `ray.kill` of the actor, `ray stop --force` and a crashed raylet all leave the engine's
processes running (they live in their own session). So every engine the agent starts is written to a node-local state
file outside Ray's temp dir (`node_state_dir()`); every new agent on the node, and the `sweep` task that `stop` sends
for an engine whose agent is gone, stops the groups whose agent no longer runs.

This module is imported on cluster nodes by Ray workers; it must not import Ray itself at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

NAMESPACE = "sage-llm"
ACTOR_PREFIX = "sage-llm-engine:"
NODE_STATE_ENV = "SAGE_LLM_NODE_STATE_DIR"


def node_state_dir() -> Path:
    """Where this node keeps what its agents started: $SAGE_LLM_NODE_STATE_DIR, else <sage-llm home>/node (0700)."""
    override = os.environ.get(NODE_STATE_ENV)
    if override:
        d = Path(override)
    else:
        from sage_llm.core import paths

        d = paths.home() / "node"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(d, 0o700)
    return d


def _entries_dir() -> Path:
    d = node_state_dir() / "engines"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _write_entry(entry: dict[str, Any]) -> None:
    path = _entries_dir() / f"{entry['engine_id']}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(entry, fh)
    os.replace(tmp, path)


def _read_entries() -> list[dict[str, Any]]:
    out = []
    for p in sorted(_entries_dir().glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(p.read_text())
            if isinstance(data, dict) and data.get("engine_id"):
                out.append(data)
    return out


def _drop_entry(engine_id: str) -> None:
    with contextlib.suppress(OSError):
        (_entries_dir() / f"{engine_id}.json").unlink()


def _agent_alive(entry: dict[str, Any]) -> bool:
    """The agent that started the engine still runs (same pid, same start: not a reused pid)."""
    from sage_llm.engine import process

    pid, ticks = entry.get("agent_pid"), entry.get("agent_ticks")
    if not pid or pid == os.getpid():
        return bool(pid)
    info = process.read_stat(int(pid))
    return info is not None and info.state not in ("Z", "X") and (ticks is None or info.ticks == ticks)


def _birth(entry: dict[str, Any]) -> Any:
    from sage_llm.engine import process

    return process.Birth(entry.get("start_ticks"), entry.get("boot_id"), entry.get("create_time"))


def engine_alive(entry: dict[str, Any]) -> bool:
    from sage_llm.engine import process

    return process.find_tree(entry.get("pid"), _birth(entry), entry["engine_id"]).alive


def stop_entry(entry: dict[str, Any], grace: float) -> dict[str, Any]:
    """Stop one engine of this node: group SIGTERM, wait, SIGKILL, verify; then its /dev/shm files and temp dir."""
    from sage_llm.engine import process

    result = process.stop_tree(entry.get("pid"), _birth(entry), entry["engine_id"], timeout=grace)
    removed: list[str] = []
    if not result.survivors:
        removed = process.sweep_shm(entry.get("create_time"), entry.get("port"), owned=result.shm_seen)
        tmp = entry.get("tmp_dir")
        if tmp and Path(tmp).is_dir() and Path(tmp).name == engine_tmp_dir(entry["engine_id"]).name:
            shutil.rmtree(tmp, ignore_errors=True)
        _drop_entry(entry["engine_id"])
    return {"stopped": not result.survivors, "survivors": result.survivors, "escalated": result.escalated,
            "shm_removed": removed, "duration_s": result.duration_s}


def sweep(engine_id: str | None = None, grace: float = 5.0) -> list[dict[str, Any]]:
    """Stop the engines of this node whose agent is gone (`engine_id`: that one only, agent or not); what was done."""
    done = []
    for entry in _read_entries():
        if engine_id is not None and entry["engine_id"] != engine_id:
            continue
        if engine_id is None and _agent_alive(entry):
            continue
        was_alive = engine_alive(entry)
        outcome = stop_entry(entry, grace)
        done.append({"engine_id": entry["engine_id"], "name": entry.get("name"), "was_alive": was_alive, **outcome})
    return done


def node_engines() -> list[dict[str, Any]]:
    """Every engine recorded on this node, with whether its processes and its agent are alive."""
    return [{**e, "alive": engine_alive(e), "agent_alive": _agent_alive(e)} for e in _read_entries()]


def engine_tmp_dir(engine_id: str) -> Path:
    """The engine's own TMPDIR: short, because vLLM binds ZMQ IPC sockets there and a socket path is at most 107
    bytes (a TMPDIR under a deep state directory makes vLLM fail at startup)."""
    import tempfile

    root = tempfile.gettempdir()
    if len(root) > 40 or not os.path.isdir(root):
        root = "/tmp"
    return Path(root) / f"sage-llm-{engine_id}"


def _node_ip() -> str:
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"


def _node_id() -> str | None:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None


def _port_free(host: str, port: int) -> bool:
    from sage_llm.engine import process

    return process.port_is_free(host, port)


def _claim_port(host: str, first: int) -> tuple[int, int]:
    """The first port from `first` that is free on `host` and not claimed by another agent of this machine (two
    agents launching at once, e.g. two replicas on one node, would otherwise both pick it: vLLM binds only after
    its load). A claim is flock(2) on `<tmp>/sage-llm-ports-<uid>/<port>.lock`; the engine inherits the locked file
    and holds the claim while it lives. Returns (port, the lock's fd)."""
    import fcntl
    import tempfile

    d = Path(tempfile.gettempdir()) / f"sage-llm-ports-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    port = first
    while port <= 65535:
        if _port_free(host, port):
            fd = os.open(d / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return port, fd
            except OSError:
                os.close(fd)
        port += 1
    raise RuntimeError(f"no free port from {first} on {host}")


def _no_nice() -> None:
    """In the engine's child: the Ray worker runs niced (15); vLLM must not."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)


class EngineAgent:
    """One engine on this node (wrapped with ray.remote by engine/cluster.py; plain Python here, testable alone)."""

    def __init__(self, name: str, engine_id: str, spec_doc: dict[str, Any] | None = None) -> None:
        """Runs once Ray has placed the agent on its node: sweep what crashed agents left here, then launch the engine
        (so a `start --no-wait` whose CLI is gone still gets its engine). No secret is passed: with --api-key-env the
        variable is read from the node's own environment."""
        self.name = name
        self.engine_id = engine_id
        self.entry: dict[str, Any] | None = None
        self.popen: Any = None
        self.launched: dict[str, Any] | None = None
        self.launch_error: str | None = None
        self.swept = sweep()  # engines left behind by an earlier crash of Ray (or of an agent) on this node
        if spec_doc is not None:
            try:
                self.launched = self.launch(spec_doc)
            except Exception as exc:
                self.launch_error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                hint = getattr(exc, "hint", None)
                if hint:
                    self.launch_error += f" (hint: {hint})"

    def where(self) -> dict[str, Any]:
        return {"node_id": _node_id(), "node_ip": _node_ip(), "pid": os.getpid(), "hostname": socket.gethostname(),
                "swept": self.swept, "launched": self.launched, "launch_error": self.launch_error}

    def launch(self, spec_doc: dict[str, Any]) -> dict[str, Any]:
        """Spawn `vllm serve` for the spec on this node: its own session, log and temp dir under the node state dir."""
        import subprocess

        from sage_llm.core.addresses import is_loopback
        from sage_llm.core.errors import UsageError
        from sage_llm.engine import envs, process
        from sage_llm.engine.vllm import LaunchSpec, build_argv, build_env

        spec = LaunchSpec(**spec_doc)
        if is_loopback(spec.host):
            spec.host = _node_ip()  # reachable from the other nodes (an explicit --host is kept)
        if spec.api_key_env and not os.environ.get(spec.api_key_env):
            raise UsageError(f"--api-key-env {spec.api_key_env}: the variable is not set on node {_node_ip()}",
                             hint="set it in the environment of `ray start` on every node (the key never travels "
                                  "through Ray)")
        cmd = envs.resolve_vllm()
        port, port_lock = _claim_port(spec.host, spec.port)
        spec.port = port
        argv = build_argv(cmd.prefix, spec)
        cpu_engine = cmd.kind == "cpu" or not _has_gpu()
        env, added = build_env(spec, self.engine_id, cpu_engine, base=dict(os.environ))
        # inherited from the Ray worker: Ray limits its workers to one OpenMP thread; vLLM sets its own
        env.pop("OMP_NUM_THREADS", None)
        for var in [k for k in env if k.startswith("RAY_") and k != "RAY_ADDRESS"]:
            env.pop(var, None)
        if cmd.env_path:
            env["PATH"] = str(Path(cmd.env_path) / "bin") + os.pathsep + env.get("PATH", "")
            env["VIRTUAL_ENV"] = cmd.env_path
        state = node_state_dir()
        tmp_dir = engine_tmp_dir(self.engine_id)
        tmp_dir.mkdir(mode=0o700, exist_ok=True)
        env["TMPDIR"] = str(tmp_dir)  # vLLM's socket files: removed with the engine
        logs = state / "logs"
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_file = logs / f"{self.name}-{self.engine_id}.log"
        with open(log_file, "ab") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(f"\n===== sage llm start {self.name} (cluster agent pid {os.getpid()}): {' '.join(argv)}\n"
                     .encode())
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND, 0o600)
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True, close_fds=True, preexec_fn=_no_nice,
                                          pass_fds=(port_lock,))  # the engine holds its port's claim while it lives
        finally:
            os.close(fd)
            os.close(port_lock)
        info = process.read_stat(self.popen.pid)
        me = process.read_stat(os.getpid())
        self.entry = {
            "engine_id": self.engine_id, "name": self.name, "pid": self.popen.pid,
            "start_ticks": info.ticks if info else None, "boot_id": process.boot_id(),
            "create_time": info.create_time if info else time.time(), "port": port, "host": spec.host,
            "log_file": str(log_file), "tmp_dir": str(tmp_dir), "agent_pid": os.getpid(),
            "agent_ticks": me.ticks if me else None, "node_id": _node_id(),
        }
        _write_entry(self.entry)
        return {**self.entry, "argv": argv, "env": added, "node_ip": _node_ip(), "cpu_engine": cpu_engine,
                "api_key_env": spec.api_key_env}

    def poll(self, lines: int = 40) -> dict[str, Any]:
        """Alive? serving? and the log's last lines (for the stage and the diagnosis on the client)."""
        from sage_llm.core.addresses import reachable_host
        from sage_llm.observe import probe as probes

        if self.entry is None:
            return {"alive": False, "ready": False, "lines": [], "launched": False}
        alive = self.popen.poll() is None if self.popen is not None else engine_alive(self.entry)
        ready = False
        if alive:
            key_env = self.launched and self.launched.get("api_key_env")
            key = os.environ.get(key_env) if key_env else None
            p = probes.probe(reachable_host(self.entry["host"]), self.entry["port"], timeout=1.0, api_key=key)
            ready = p.health == 200 and (p.models_status == 401 or bool(p.model_ids))
        return {"alive": alive, "ready": ready, "lines": self.log_lines(lines), "launched": True,
                "returncode": None if self.popen is None else self.popen.poll()}

    def log_lines(self, lines: int = 100) -> list[str]:
        from sage_llm.observe import logs as logtools

        if self.entry is None:
            return []
        return logtools.tail(Path(self.entry["log_file"]), lines)

    def log_bytes(self, max_bytes: int = 4 * 1024 * 1024) -> bytes:
        if self.entry is None:
            return b""
        try:
            with open(self.entry["log_file"], "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - max_bytes))
                return fh.read()
        except OSError:
            return b""

    def stop(self, grace: float = 30.0) -> dict[str, Any]:
        """Stop the engine (see stop_entry); the agent itself is killed by the caller afterwards."""
        if self.entry is None:
            return {"stopped": True, "survivors": [], "escalated": False, "shm_removed": [], "duration_s": 0.0}
        outcome = stop_entry(self.entry, grace)
        if self.popen is not None:
            with contextlib.suppress(Exception):
                self.popen.wait(timeout=1)
        return outcome


def _has_gpu() -> bool:
    try:
        from sage_llm.observe import gpu

        return gpu.gpu_count() > 0
    except Exception:
        return False
