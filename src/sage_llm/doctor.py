"""`sage-llm doctor`: check what breaks starts, each line ok / warn / fail with the fix.

Checks: settings, engine environment and its vLLM version, NVML and driver, GPUs and their free memory, the default
port, the Hugging Face cache (location, free disk), the state directory (owner, permissions), HF_HUB_OFFLINE, the
Hugging Face token, and how the commands are reached under SAGE's `sage` when SAGE is installed. Secrets are never
read into a message: the token is reported only as present and where from.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"
GiB = 1024**3
CACHE_WARN_FREE = 20 * GiB  # a 7B model in bf16 is about 15 GiB
CACHE_FAIL_FREE = 2 * GiB


@dataclass
class Check:
    name: str  # short id: engine, nvml, gpu0, port, hf_cache, state_dir, hf_offline, hf_token, settings, sage
    status: str  # ok | warn | fail
    message: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def check_settings() -> list[Check]:
    from sage_llm.core import settings

    try:
        resolved, warnings = settings.resolve_all()
    except settings.ConfigError as exc:
        return [Check("settings", FAIL, exc.message, exc.hint)]
    out = [Check("settings", FAIL, r.error, f"fix {r.where()}, or `sage-llm config set {r.key} VALUE`")
           for r in resolved if r.error]
    out += [Check("settings", WARN, w, "remove it, or fix its spelling (`sage-llm config show` lists the names)")
            for w in warnings]
    return out or [Check("settings", OK, f"settings valid (config file: {settings.config_path()})")]


def check_engine(version_timeout: float = 120.0) -> list[Check]:
    from sage_llm.core.errors import SageLLMError
    from sage_llm.engine import envs

    try:
        cmd = envs.resolve_vllm()
    except SageLLMError as exc:
        return [Check("engine", FAIL, exc.message, exc.hint or "run `sage-llm engine install`")]
    where = {"engine-env": f"engine environment {cmd.env_path}", "PATH": "`vllm` on PATH"}.get(cmd.source, cmd.source)
    version = envs.reported_version(cmd.prefix, timeout=version_timeout)
    if version is None:
        return [Check("engine", FAIL, f"vLLM from {where} does not run (`{' '.join(cmd.prefix)} --version` failed)",
                      "repair it with `sage-llm engine install`; `sage-llm engine show` says what runs")]
    kind = f" ({cmd.kind})" if cmd.kind else ""
    return [Check("engine", OK, f"vLLM {version}{kind} from {where}")]


def check_gpus(gpu_util: float | None, engine_kind: str | None) -> list[Check]:
    from sage_llm.observe import gpu

    reason = gpu.error()
    if reason is not None:
        if engine_kind == "gpu":
            return [Check("nvml", FAIL, f"{reason}, but the engine environment is the GPU build",
                          "install the NVIDIA driver (in containers: run with --gpus all), or `sage-llm engine "
                          "install --cpu`")]
        return [Check("nvml", WARN, f"{reason}: only the CPU build of vLLM can run here",
                      "install the NVIDIA driver for GPU engines (in containers: --gpus all / the NVIDIA runtime)")]
    driver, cuda = gpu.driver_version()
    snap = gpu.snapshot(with_processes=False)
    detail = f"driver {driver}" if driver else "driver version unknown"
    if cuda:
        detail += f", CUDA {cuda}"
    out = [Check("nvml", OK, f"NVML works ({detail}), {len(snap.gpus)} GPU(s)")]
    if not snap.gpus:
        out.append(Check("gpus", WARN, "NVML sees no GPU", "check CUDA_VISIBLE_DEVICES and the container's GPU "
                                                           "access (nvidia-smi)"))
    for g in snap.gpus:
        name = f"gpu{g.index}"
        if g.memory_total_bytes is None or g.memory_free_bytes is None:
            out.append(Check(name, WARN, f"GPU {g.index} {g.name or ''}: memory unknown".replace("  ", " "), None))
            continue
        free, total = g.memory_free_bytes, g.memory_total_bytes
        text = f"GPU {g.index} {g.name or ''}: {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB"
        want = gpu_util * total if gpu_util else None
        if want is not None and free < want:
            lower = max(0.05, round(free / total - 0.05, 2))
            out.append(Check(name, WARN, f"{text}; less than the {gpu_util:g} share vLLM asks for "
                                         f"({want / GiB:.1f} GiB)",
                             f"stop what uses it (`sage-llm status`, nvidia-smi), pick another GPU with --gpus, or "
                             f"lower the share: sage-llm config set gpu_util {lower}"))
        else:
            out.append(Check(name, OK, text))
    return out


def check_port(port: int, host: str) -> list[Check]:
    from sage_llm.core.state import EngineRecord, StateStore
    from sage_llm.engine import process

    for rec in StateStore().all():
        if isinstance(rec, EngineRecord) and rec.port == port and process.leader(rec.pid, process.birth_of(rec)):
            return [Check("port", OK, f"port {port} is served by engine {rec.name!r} (managed)")]
    if process.port_is_free(host, port):
        return [Check("port", OK, f"port {port} on {host} is free")]
    pid, pname = process.port_owner(port)
    who = f" by {pname} (pid {pid})" if pid else ""
    return [Check("port", WARN, f"port {port} is in use{who}; `start` without --port takes the next free one, and "
                                "Studio looks for the local engine on this port",
                  "free it, or choose another: sage-llm config set local_engine_port PORT")]


def _existing_parent(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_hf_cache() -> list[Check]:
    from sage_llm.models.hf_cache import cached_repo_ids, hub_cache_dir

    cache = hub_cache_dir()
    base = _existing_parent(cache)
    try:
        free = shutil.disk_usage(base).free
    except OSError as exc:
        return [Check("hf_cache", FAIL, f"cannot inspect the HF cache {cache}: {exc.strerror}",
                      "set HF_HOME or HF_HUB_CACHE to a directory you can write")]
    if not os.access(base, os.W_OK):
        return [Check("hf_cache", FAIL, f"HF cache {cache} is not writable", "fix its permissions, or set HF_HOME or "
                                                                              "HF_HUB_CACHE to a directory you own")]
    models = len(cached_repo_ids(cache))
    text = (f"HF cache {cache}{'' if cache.exists() else ' (not created yet)'}: {models} model(s), "
            f"{free / GiB:.1f} GiB free")
    if free < CACHE_FAIL_FREE:
        return [Check("hf_cache", FAIL, text, "free disk space (`sage-llm models rm MODEL`), or move the cache with "
                                              "HF_HOME")]
    if free < CACHE_WARN_FREE:
        return [Check("hf_cache", WARN, text + "; a 7B model needs about 15 GiB",
                      "free disk space, or move the cache with HF_HOME")]
    return [Check("hf_cache", OK, text)]


def check_state_dir() -> list[Check]:
    from sage_llm.core import paths
    from sage_llm.core.config import EnvVars

    root = paths.home()
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        parent = _existing_parent(root)
        if not os.access(parent, os.W_OK):
            return [Check("state_dir", FAIL, f"state directory {root} does not exist and {parent} is not writable",
                          f"set {EnvVars.HOME} to a directory you own")]
        return [Check("state_dir", OK, f"state directory {root} (created 0700 on first use)")]
    except OSError as exc:
        return [Check("state_dir", FAIL, f"cannot inspect state directory {root}: {exc.strerror}",
                      f"set {EnvVars.HOME} to a directory you own")]
    if stat.S_ISLNK(st.st_mode):
        return [Check("state_dir", FAIL, f"state directory {root} is a symlink (refused)",
                      f"remove the link, or point {EnvVars.HOME} at a real directory you own")]
    if not stat.S_ISDIR(st.st_mode):
        return [Check("state_dir", FAIL, f"state path {root} is not a directory", f"remove it, or set {EnvVars.HOME}")]
    if st.st_uid != os.getuid():
        return [Check("state_dir", FAIL, f"state directory {root} is owned by uid {st.st_uid}, not you "
                                         f"(uid {os.getuid()})", f"set {EnvVars.HOME} to a directory of your own")]
    mode = stat.S_IMODE(st.st_mode)
    if not os.access(root, os.W_OK | os.X_OK):
        return [Check("state_dir", FAIL, f"state directory {root} is not writable (mode {mode:o})",
                      f"chmod 700 {root}")]
    if mode & 0o077:
        return [Check("state_dir", WARN, f"state directory {root} is readable by others (mode {mode:o}); it is made "
                                         "0700 on the next change", f"chmod 700 {root}")]
    return [Check("state_dir", OK, f"state directory {root} (yours, mode {mode:o})")]


def _token_source() -> str | None:
    """Where a Hugging Face token comes from (never the token itself), or None."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return f"${var}"
    if os.environ.get("HF_TOKEN_PATH"):
        path = Path(os.environ["HF_TOKEN_PATH"]).expanduser()
    elif os.environ.get("HF_HOME"):
        path = Path(os.environ["HF_HOME"]).expanduser() / "token"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "token"
    try:
        if path.is_file() and path.stat().st_size > 0:
            return str(path)
    except OSError:
        return None
    return None


def check_hf_access() -> list[Check]:
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE"))
    out = [Check("hf_offline", OK, "HF_HUB_OFFLINE=1: only models already in the cache can start",
                 None) if offline else
           Check("hf_offline", OK, "HF_HUB_OFFLINE unset: models missing from the cache are downloaded at start")]
    source = _token_source()
    if source:
        out.append(Check("hf_token", OK, f"Hugging Face token set (from {source})"))
    elif offline:
        out.append(Check("hf_token", OK, "no Hugging Face token (not needed offline)"))
    else:
        out.append(Check("hf_token", WARN, "no Hugging Face token: gated models (Llama, Gemma, ...) fail to download",
                         "export HF_TOKEN=... or run `hf auth login`"))
    return out


def check_sage(names_timeout: float = 60.0) -> list[Check]:
    """Whether SAGE's `sage` is installed and under which names our commands are reached there, and why: read from the
    package metadata, then asked of SAGE's `sage` itself in a child process (core/sage_cli.py names_in_sage)."""
    from sage_llm.core import sage_cli

    cli = sage_cli.installed()
    if cli is None:
        return [Check("sage", OK, "SAGE's `sage` command is not installed: the commands are `sage-llm ...`")]
    where = f"SAGE's `sage` ({cli.dist} {cli.version}, entry {cli.entry})"
    if not sage_cli.plugin_registered():
        return [Check("sage", WARN, f"{where} is installed, but sage-llm's `{sage_cli.PLUGIN_GROUP}` entry point is "
                                    "missing: only `sage-llm ...` works", "reinstall sage-llm: pip install "
                                    "--force-reinstall --no-deps sage-llm")]
    names = sage_cli.names_in_sage(cli, timeout=names_timeout)
    if isinstance(names, str):
        return [Check("sage", WARN, f"{where} is installed, but which names it gives sage-llm's commands is unknown "
                                    f"({names}); `sage-llm ...` works everywhere",
                      "run `sage --help`: it lists `vllm` (always ours) and `llm` (ours where SAGE has none)")]
    # ("`sage-llm ...`" is not followed by a subcommand: the CLI does not respell it as the running program's name)
    got = [n for n in names if n.got]
    said = "; ".join(f"`{n.name}` {'ours' if n.got else 'not ours'}: {n.why}" for n in names)
    if not got:
        return [Check("sage", WARN, f"{where} is installed, but none of sage-llm's names is free there ({said}); "
                                    "`sage-llm ...` works everywhere", "use `sage-llm ...`")]
    listed = " and ".join(f"`{n.name}`" for n in got)
    return [Check("sage", OK, f"{where} is installed: the commands are also under {listed} there ({said}); "
                              "`sage-llm ...` works everywhere")]


def run_checks(version_timeout: float = 120.0, on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check, in order; `on_check` sees each result as soon as it is known."""
    from sage_llm.core import settings
    from sage_llm.engine import envs

    def safe(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
        try:
            results = fn()
        except Exception as exc:  # a check that breaks is a finding, not a crash
            results = [Check(name, FAIL, f"check failed: {type(exc).__name__}: {exc}", "set SAGE_LLM_DEBUG=1 and "
                             "report it")]
        for c in results:
            if on_check:
                on_check(c)
        return results

    def setting(key: str) -> Any:
        try:
            return settings.get(key)
        except settings.ConfigError:
            return settings.BY_KEY[key].default

    recorded = envs.load_recorded()
    checks = safe("settings", check_settings)
    checks += safe("engine", lambda: check_engine(version_timeout))
    checks += safe("nvml", lambda: check_gpus(setting("gpu_util"), recorded.kind if recorded else None))
    checks += safe("port", lambda: check_port(setting("local_engine_port"), setting("host")))
    checks += safe("hf_cache", check_hf_cache)
    checks += safe("state_dir", check_state_dir)
    checks += safe("hf_offline", check_hf_access)
    checks += safe("sage", check_sage)
    return checks


def summary(checks: list[Check]) -> dict[str, int]:
    return {s: sum(1 for c in checks if c.status == s) for s in (OK, WARN, FAIL)}
