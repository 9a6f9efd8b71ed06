"""Use cases behind `sage-llm models`: list, pull, remove, import GGUF, recommend. No printing, no Typer, no Rich.

huggingface_hub is imported inside the functions that need it (pull, remove, sizes from the hub), never at import.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sage_llm.core.errors import SageLLMError, UsageError
from sage_llm.models import hf_cache

LIVE_STATES = ("ready", "starting", "unhealthy")
REPO_ID_HINT = "give a Hugging Face repo id like Qwen/Qwen2.5-1.5B-Instruct"


class ModelNotFound(UsageError):
    """No such model in the local caches."""


class ModelInUse(SageLLMError):
    """An engine serves the model: it cannot be removed."""


class DownloadError(SageLLMError):
    """The hub refused or could not be reached."""


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id) or ".." in parts:
        raise UsageError(f"{repo_id!r} is not a repo id (ORG/NAME)", hint=REPO_ID_HINT)
    return repo_id


# ---------------------------------------------------------------------------------------------------------- list
def _engine_views(store: Any) -> tuple[list[Any], list[str]]:
    """Live views of managed engines; nothing is imported or probed when no engine is recorded."""
    if store is None:
        from sage_llm.core import paths

        try:
            if not any(n.endswith(".json") for n in os.listdir(paths.engines_dir())):
                return [], []
        except OSError:
            return [], []
        from sage_llm.core.state import StateStore

        store = StateStore()
    if not store.names():
        return [], []
    from sage_llm.engine.inspect import inspect

    return inspect(store, include_external=False)


def _serves(view: Any, model: hf_cache.LocalModel) -> bool:
    target = view.model or ""
    if target == model.repo_id:
        return True
    if target.startswith(("/", ".", "~")):
        real = os.path.realpath(os.path.expanduser(target))
        return real == os.path.realpath(model.repo_path) or real.startswith(os.path.realpath(model.repo_path) + os.sep)
    return False


def local_models(store: Any = None) -> tuple[list[hf_cache.LocalModel], list[str]]:
    """Models in the hub cache and in every `--download-dir` a recorded engine uses, each with the engines serving it
    now. Returns (models, warnings)."""
    warnings: list[str] = []
    views, w = _engine_views(store)
    warnings += w
    extra = []
    for v in views:
        settings = getattr(v.record, "settings", None) or {}
        if settings.get("download_dir"):
            extra.append(str(settings["download_dir"]))
    models = hf_cache.list_models(extra)
    for m in models:
        if m.error:
            warnings.append(f"{m.repo_id}: {m.error}")
        for v in views:
            if v.state in LIVE_STATES and _serves(v, m):
                m.served_by.append({"name": v.name, "state": v.state, "port": v.port, "pid": v.pid,
                                    "base_url": v.base_url})
    models.sort(key=lambda m: (m.repo_id.lower(), m.source))
    return models, warnings


def find_local(repo_id: str, store: Any = None) -> list[hf_cache.LocalModel]:
    models, _ = local_models(store)
    return [m for m in models if m.repo_id == repo_id]


# ------------------------------------------------------------------------------------------------------------ rm
class RemovePlan:
    def __init__(self, repo_id: str, entries: list[hf_cache.LocalModel], freed_bytes: int) -> None:
        self.repo_id, self.entries, self.freed_bytes = repo_id, entries, freed_bytes


def plan_remove(repo_id: str, store: Any = None) -> RemovePlan:
    """What `rm` would delete; refuses (ModelInUse) while an engine serves the model."""
    check_repo_id(repo_id)
    entries = find_local(repo_id, store)
    if not entries:
        raise ModelNotFound(f"{repo_id} is not in the local cache ({hf_cache.hub_cache_dir()})",
                            hint="see `sage-llm models` for what is there")
    users = [u for m in entries for u in m.served_by]
    if users:
        names = ", ".join(f"{u['name']} (port {u['port']})" for u in users)
        first = users[0]["name"]
        raise ModelInUse(f"{repo_id} is served by engine {names}; nothing was removed",
                         hint=f"stop it first: sage-llm stop {first}")
    return RemovePlan(repo_id, entries, sum(m.size_on_disk + m.incomplete_bytes for m in entries))


def remove(plan: RemovePlan) -> int:
    """Delete every cached copy in the plan (through huggingface_hub's delete strategy); returns the bytes freed."""
    from sage_llm.core import audit

    with audit.operation("model rm", {"repo_id": plan.repo_id}) as op:
        op.result = {"paths": [m.repo_path for m in plan.entries]}
        freed = _remove(plan)
        op.result["freed_bytes"] = freed
    return freed


def _remove(plan: RemovePlan) -> int:
    freed = 0
    for m in plan.entries:
        before = _du(m.repo_path)
        if m.revisions and m.error is None:
            from huggingface_hub import scan_cache_dir

            info = scan_cache_dir(m.cache_dir)
            hashes = [r.commit_hash for repo in info.repos if repo.repo_id == m.repo_id and repo.repo_type == "model"
                      for r in repo.revisions]
            if hashes:
                info.delete_revisions(*hashes).execute()
        if os.path.lexists(m.repo_path):  # nothing but partial downloads, or a corrupt entry
            import shutil

            shutil.rmtree(m.repo_path, ignore_errors=True)
        freed += before - _du(m.repo_path)
    return freed


def _du(path: str) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, n)):
                total += st.st_size
    return total


# ---------------------------------------------------------------------------------------------------------- pull
class PullResult:
    def __init__(self, repo_id: str, revision: str, snapshot_path: str, size_on_disk: int, nb_files: int,
                 seconds: float) -> None:
        self.repo_id, self.revision, self.snapshot_path = repo_id, revision, snapshot_path
        self.size_on_disk, self.nb_files, self.seconds = size_on_disk, nb_files, seconds

    def __repr__(self) -> str:
        return f"PullResult({self.__dict__!r})"


BytesProgress = Callable[[int, int | None], None]  # (bytes done, bytes total or None)


def _progress_class(on_bytes: BytesProgress | None) -> Any:
    """A tqdm class for snapshot_download that draws nothing and forwards the byte counts to `on_bytes`."""
    from tqdm.auto import tqdm

    class _Forward(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            self._bytes = kwargs.get("unit") == "B" and not str(kwargs.get("desc", "")).startswith("Downloading")
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.n = kwargs.get("initial", 0) or 0

        def update(self, n: float | None = 1) -> bool | None:
            self.n += n or 0
            if self._bytes and on_bytes is not None:
                on_bytes(int(self.n), int(self.total) if self.total else None)
            return None

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            if self._bytes and on_bytes is not None:
                on_bytes(int(self.n), int(self.total) if self.total else None)

    return _Forward


def pull(repo_id: str, revision: str | None = None, include: list[str] | None = None,
         on_bytes: BytesProgress | None = None, cache_dir: str | None = None) -> PullResult:
    """Download (or finish downloading) a model into the hub cache. Honours HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE."""
    check_repo_id(repo_id)
    from sage_llm.core import audit

    with audit.operation("model pull", {"repo_id": repo_id, "revision": revision, "include": include,
                                        "endpoint": _endpoint()}) as op:
        result = _pull(repo_id, revision, include, on_bytes, cache_dir)
        op.result = {"snapshot_path": result.snapshot_path, "size_on_disk": result.size_on_disk,
                     "nb_files": result.nb_files}
    return result


def _pull(repo_id: str, revision: str | None, include: list[str] | None, on_bytes: BytesProgress | None,
          cache_dir: str | None) -> PullResult:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    t0 = time.monotonic()
    login = "set HF_TOKEN or run `hf auth login`, and accept the model's licence on its hub page"
    # huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at its import: pass them per call
    cache = str(Path(cache_dir).expanduser()) if cache_dir else str(hf_cache.hub_cache_dir())
    try:
        path = snapshot_download(repo_id, revision=rev, allow_patterns=include or None, cache_dir=cache,
                                 endpoint=_endpoint(), local_files_only=_offline(),
                                 tqdm_class=_progress_class(on_bytes), max_workers=4)
    except GatedRepoError as exc:
        raise DownloadError(f"{repo_id} is gated: access denied ({_status(exc)})", hint=login) from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{repo_id} has no revision {rev!r} (404)",
                            hint="check --revision (a branch, tag or commit)") from exc
    except RepositoryNotFoundError as exc:
        code = _status(exc)
        if code in (401, 403):
            raise DownloadError(f"{repo_id}: not authorised ({code}); it is private or gated, or your token is wrong",
                                hint=login) from exc
        raise DownloadError(f"{repo_id} was not found on the hub ({code or 404})",
                            hint="check the spelling (ORG/NAME); private repos need HF_TOKEN") from exc
    except LocalEntryNotFoundError as exc:
        if _offline():
            raise DownloadError(f"cannot download {repo_id}: HF_HUB_OFFLINE is set and it is not in the cache",
                                hint="unset HF_HUB_OFFLINE, or copy the model in with `sage-llm models import`") \
                from exc
        raise DownloadError(f"cannot reach the hub at {_endpoint()} to download {repo_id}",
                            hint="check the network (or HF_ENDPOINT); a re-run resumes the download") from exc
    except HfHubHTTPError as exc:
        code = _status(exc)
        if code in (401, 403):
            raise DownloadError(f"{repo_id}: not authorised ({code})", hint=login) from exc
        raise DownloadError(f"hub error {code} while downloading {repo_id}",
                            hint="try again later; a re-run resumes the download") from exc
    except OSError as exc:
        raise DownloadError(f"download of {repo_id} failed: {exc}",
                            hint="check free disk space and the network; a re-run resumes it") from exc
    except Exception as exc:  # httpx connection errors and the like
        if type(exc).__name__ in ("ConnectError", "ReadError", "RemoteProtocolError", "ReadTimeout", "ConnectTimeout",
                                  "TimeoutException", "NetworkError"):
            raise DownloadError(f"connection to {_endpoint()} failed while downloading {repo_id}: {exc}",
                                hint="a re-run resumes the download where it stopped") from exc
        raise
    _drop_stale_partials(hf_cache.repo_dir(repo_id, Path(cache)))
    entries = [m for m in hf_cache.scan(cache) if m.repo_id == repo_id]
    size = entries[0].size_on_disk if entries else 0
    nfiles = entries[0].nb_files if entries else 0
    return PullResult(repo_id, rev, str(path), size, nfiles, time.monotonic() - t0)


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None)
    return int(code) if isinstance(code, int) else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _drop_stale_partials(repo: Path) -> None:
    """Remove `<etag>.<id>.incomplete` files left by a killed download whose blob has since been completed."""
    blobs = repo / "blobs"
    try:
        names = os.listdir(blobs)
    except OSError:
        return
    done = {n for n in names if not n.endswith(".incomplete")}
    for n in names:
        if n.endswith(".incomplete") and n.split(".", 1)[0] in done:
            with contextlib.suppress(OSError):
                os.unlink(blobs / n)


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


# -------------------------------------------------------------------------------------------------------- import
GGUF_EXTRAS = ["gguf", "accelerate"]


class ImportResult:
    def __init__(self, repo_id: str, snapshot_path: str, size_on_disk: int, seconds: float,
                 installed: list[str] | None = None) -> None:
        self.repo_id, self.snapshot_path, self.size_on_disk = repo_id, snapshot_path, size_on_disk
        self.seconds, self.installed = seconds, installed or []


def _engine_python(progress: Callable[[str], None], install_missing: bool) -> tuple[str, list[str]]:
    """The engine environment's Python, with gguf and accelerate importable (installed on demand)."""
    import subprocess

    from sage_llm.engine import envs

    env = envs.load_recorded()
    if env is None or not Path(env.python).exists():
        raise SageLLMError("no engine environment is installed; the conversion runs with its torch and transformers",
                           hint="run `sage-llm engine install --gguf` first")
    missing = []
    for mod in GGUF_EXTRAS:
        ok = subprocess.run([env.python, "-c", f"import {mod}"], capture_output=True).returncode == 0
        if not ok:
            missing.append(mod)
    if missing:
        if not install_missing:
            raise SageLLMError(f"the engine environment lacks {', '.join(missing)}",
                               hint="run `sage-llm engine install --gguf`")
        progress(f"installing {' and '.join(missing)} into the engine environment {env.path}")
        envs.install(env.kind, Path(env.path), extras=missing, progress=progress)
    return env.python, missing


def import_gguf(gguf: str | Path, repo_id: str, cache_dir: str | Path | None = None,
                progress: Callable[[str], None] = lambda _m: None, install_missing: bool = True,
                python: str | None = None, force: bool = False) -> ImportResult:
    """Convert a GGUF file to a bf16 safetensors checkpoint and lay it out in the hub cache as `repo_id`."""
    check_repo_id(repo_id)
    from sage_llm.core import audit

    with audit.operation("model import", {"file": str(gguf), "repo_id": repo_id, "force": force}) as op:
        result = _import_gguf(gguf, repo_id, cache_dir, progress, install_missing, python, force)
        op.result = {"snapshot_path": result.snapshot_path, "size_on_disk": result.size_on_disk,
                     "installed": result.installed}
    return result


def _import_gguf(gguf: str | Path, repo_id: str, cache_dir: str | Path | None, progress: Callable[[str], None],
                 install_missing: bool, python: str | None, force: bool) -> ImportResult:
    src = Path(gguf).expanduser()
    if not src.is_file():
        raise UsageError(f"{gguf} does not exist or is not a file", hint="give the path of a .gguf file")
    with open(src, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise UsageError(f"{gguf} is not a GGUF file (no GGUF magic)", hint="give the path of a .gguf file")
    cache = Path(cache_dir).expanduser() if cache_dir else hf_cache.hub_cache_dir()
    target = hf_cache.repo_dir(repo_id, cache)
    if target.exists():
        if not force:
            raise UsageError(f"{repo_id} already exists in {cache}",
                             hint=f"remove it with `sage-llm models rm {repo_id}`, pick another --as, or add --force")
        users = [u for m in local_models()[0] if os.path.realpath(m.repo_path) == os.path.realpath(target)
                 for u in m.served_by]
        if users:
            raise ModelInUse(f"{repo_id} is served by engine {users[0]['name']}; it cannot be replaced now",
                             hint=f"stop it first: sage-llm stop {users[0]['name']}")
    installed: list[str] = []
    if python is None:
        python, installed = _engine_python(progress, install_missing)
    import shutil
    import tempfile

    script = Path(__file__).resolve().parents[1] / "engine" / "scripts" / "gguf_import.py"
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    # converted into a staging cache on the same filesystem, then moved in whole: an interrupted or failed import
    # leaves nothing half-written under the repo id, and --force replaces the old model only once the new one is done
    staging = Path(tempfile.mkdtemp(prefix=".sage-import-", dir=cache))
    try:
        result = _convert(python, script, src, staging, repo_id, progress)
        if target.exists():
            shutil.rmtree(target)
        os.rename(hf_cache.repo_dir(repo_id, staging), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    snapshot = target / "snapshots" / Path(result["snapshot"]).name
    return ImportResult(repo_id, str(snapshot), int(result["size"]), time.monotonic() - t0, installed)


def _convert(python: str, script: Path, src: Path, staging: Path, repo_id: str, progress: Callable[[str], None]
             ) -> dict[str, Any]:
    import subprocess

    cmd = [python, str(script), str(src.absolute()), str(staging), repo_id]
    progress(f"converting {src.name} with {python} (dequantize to bf16 safetensors)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                 "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    tail: list[str] = []
    result: dict[str, Any] = {}
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.startswith("STEP "):
            progress("  " + line[len("STEP "):])
        elif line:
            tail = (tail + [line])[-20:]
    code = proc.wait()
    if code != 0 or not result:
        last = next((ln for ln in reversed(tail) if ln.strip()), "no output")
        raise SageLLMError(f"GGUF conversion failed (exit {code}): {last[-300:]}",
                           hint="transformers must support this GGUF architecture; see the output above")
    return result


# ----------------------------------------------------------------------------------------------------- recommend
def _tp_fit(frees: list[int], need: int) -> int | None:
    """The smallest tensor-parallel size (2, 4, 8) whose share of `need` fits on that many GPUs, or None."""
    ranked = sorted(frees, reverse=True)
    for tp in (2, 4, 8):
        if tp <= len(ranked) and ranked[tp - 1] >= need / tp:
            return tp
    return None


def recommended() -> list[dict[str, Any]]:
    from importlib import resources

    data = json.loads(resources.files("sage_llm").joinpath("data/recommended_models.json").read_text("utf-8"))
    return list(data["models"])


def recommend(snapshot: Any = None) -> tuple[list[dict[str, Any]], str | None]:
    """The curated list, each with a `fit` computed from the GPUs' free memory now. Returns (rows, gpu_error)."""
    if snapshot is None:
        from sage_llm.observe import gpu

        snapshot = gpu.snapshot(with_processes=False)
    frees = [(g.index, g.memory_free_bytes) for g in snapshot.gpus]
    known = [(i, f) for i, f in frees if f is not None]
    rows = []
    for entry in recommended():
        need = int(float(entry["min_gpu_memory_gib"]) * 1024**3)
        row = dict(entry)
        row["min_gpu_memory_bytes"] = need
        row["gpus_that_fit"] = [i for i, f in known if f >= need]
        if not frees:
            row["fit"] = "no GPU"
        elif not known:
            row["fit"] = "unknown"
        elif row["gpus_that_fit"]:
            row["fit"] = "fits"
        elif (tp := _tp_fit([f for _, f in known], need)) is not None:
            row["fit"] = f"fits with -tp {tp}"
        else:
            row["fit"] = "too large"
        row["best_free_bytes"] = max((f for _, f in known), default=None)
        rows.append(row)
    return rows, snapshot.error
