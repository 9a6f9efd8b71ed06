"""The Hugging Face hub cache: where it is, and whether a model is complete in it (no huggingface_hub import here,
so `start` and completion stay fast; listing with sizes and metadata uses `huggingface_hub.scan_cache_dir`)."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

from sage_llm.core.paths import hub_cache_dir, repo_dir  # the cache's layout lives in core: observe/ watches it

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def snapshot_path(repo_id: str, revision: str = "main", cache: Path | None = None) -> Path | None:
    rdir = repo_dir(repo_id, cache)
    ref = rdir / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        commit = revision
    snap = rdir / "snapshots" / commit
    return snap if snap.is_dir() else None


def is_cached(repo_id: str, cache: Path | None = None) -> bool:
    """True when the model's `main` snapshot has config.json and weights, and no download is half-done."""
    snap = snapshot_path(repo_id, cache=cache)
    if snap is None or not (snap / "config.json").exists():
        return False
    try:
        names = os.listdir(snap)
    except OSError:
        return False
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        return False
    blobs = repo_dir(repo_id, cache) / "blobs"
    try:
        names = os.listdir(blobs)
    except OSError:
        return True
    done = {n for n in names if not n.endswith(".incomplete")}
    # a partial file whose blob is complete is the leftover of a killed download, not a missing file
    return not any(n.endswith(".incomplete") and n.split(".", 1)[0] not in done for n in names)


def cached_repo_ids(cache: Path | None = None) -> list[str]:
    """Model repo ids present in the cache, from the directory listing only (used by shell completion)."""
    try:
        entries = os.listdir(cache or hub_cache_dir())
    except OSError:
        return []
    out = []
    for e in entries:
        if e.startswith("models--"):
            out.append(e[len("models--"):].replace("--", "/", 1).replace("--", "/"))
    return sorted(out)


# ---------------------------------------------------------------------------------------------------- listing
# `models list` reads the cache with the stdlib: `import huggingface_hub` alone costs about 0.2-0.3 s here, which would
# eat the whole budget of `models --json` (300 ms on 200 repos). The walk below follows
# `huggingface_hub.scan_cache_dir()` (hub 2.4, utils/_cache_manager.py) field for field -- sizes count each blob once,
# a revision's size counts its distinct blobs, last used/modified are the newest blob atime/mtime -- and the tests
# check it against `scan_cache_dir` on the same layouts. Deleting goes through huggingface_hub itself.

CONFIG_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                       "n_ctx", "model_max_length")


# Plain classes, not dataclasses: `import dataclasses` (with inspect) costs about 20 ms of CPU, a tenth of the whole
# `models --json` run.
class Revision:
    def __init__(self, commit_hash: str, refs: list[str], size_on_disk: int, nb_files: int, last_modified: float,
                 snapshot_path: str, files: list[str] | None = None) -> None:
        self.commit_hash = commit_hash
        self.refs = refs
        self.size_on_disk = size_on_disk
        self.nb_files = nb_files
        self.last_modified = last_modified
        self.snapshot_path = snapshot_path
        self.files = files or []

    def to_json(self) -> dict[str, Any]:
        return {"commit_hash": self.commit_hash, "refs": self.refs, "size_on_disk": self.size_on_disk,
                "nb_files": self.nb_files, "last_modified": _iso(self.last_modified),
                "snapshot_path": self.snapshot_path}


class LocalModel:
    """One model repo found in a Hugging Face cache directory."""

    def __init__(self, repo_id: str, cache_dir: str, repo_path: str) -> None:
        self.repo_id = repo_id
        self.cache_dir = cache_dir
        self.repo_path = repo_path
        self.size_on_disk = 0
        self.nb_files = 0
        self.revisions: list[Revision] = []
        self.last_accessed: float | None = None
        self.last_modified: float | None = None
        self.architecture: str | None = None
        self.model_type: str | None = None
        self.context_length: int | None = None
        self.quantization: str | None = None
        self.torch_dtype: str | None = None
        self.incomplete_files = 0
        self.incomplete_bytes = 0
        self.complete = False  # the main (or newest) snapshot has config.json and weights, nothing is half-done
        self.source = "hf-cache"  # or "download-dir"
        self.error: str | None = None  # the repo directory is corrupt (what scan_cache_dir would warn about)
        self.served_by: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return f"LocalModel({self.repo_id!r}, {self.size_on_disk} bytes, source={self.source!r})"

    @property
    def incomplete(self) -> bool:
        return self.incomplete_files > 0 or (not self.complete and self.error is None)

    @property
    def main_snapshot(self) -> str | None:
        for rev in self.revisions:
            if "main" in rev.refs:
                return rev.snapshot_path
        if self.revisions:
            return max(self.revisions, key=lambda r: r.last_modified).snapshot_path
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id, "size_on_disk": self.size_on_disk, "nb_files": self.nb_files,
            "revisions": [r.to_json() for r in self.revisions], "last_accessed": _iso(self.last_accessed),
            "last_modified": _iso(self.last_modified), "architecture": self.architecture,
            "model_type": self.model_type, "context_length": self.context_length,
            "quantization": self.quantization, "torch_dtype": self.torch_dtype, "complete": self.complete,
            "incomplete": self.incomplete, "incomplete_files": self.incomplete_files,
            "incomplete_bytes": self.incomplete_bytes, "source": self.source, "cache_dir": self.cache_dir,
            "repo_path": self.repo_path, "snapshot_path": self.main_snapshot, "served_by": self.served_by,
            "error": self.error,
        }


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_config(snapshot: str | Path) -> dict[str, Any]:
    """architecture, model_type, context_length, quantization, torch_dtype from a snapshot's config.json."""
    try:
        with open(Path(snapshot) / "config.json", encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    archs = cfg.get("architectures")
    ctx = None
    for src in (cfg, text):
        for key in CONFIG_CONTEXT_KEYS:
            if isinstance(src.get(key), int) and src[key] > 0:
                ctx = src[key]
                break
        if ctx:
            break
    quant = cfg.get("quantization_config") or text.get("quantization_config")
    method = None
    if isinstance(quant, dict):
        method = quant.get("quant_method") or quant.get("quantization_method") or quant.get("format")
        if method is None and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
            method = "bitsandbytes"
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype")
    return {
        "architecture": archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None,
        "model_type": cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None,
        "context_length": ctx,
        "quantization": str(method) if method else None,
        "torch_dtype": dtype if isinstance(dtype, str) else None,
    }


def _walk_files(top: str, prefix: str = "") -> list[tuple[str, str, bool]]:
    """(path, path relative to the first `top`, is a symlink) of every non-directory under `top`, via scandir."""
    out: list[tuple[str, str, bool]] = []
    try:
        entries = list(os.scandir(top))
    except OSError:
        return out
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            out.extend(_walk_files(e.path, prefix + e.name + "/"))
        else:
            out.append((e.path, prefix + e.name, e.is_symlink()))
    return out


def _scan_repo(repo_path: Path, cache_dir: Path) -> LocalModel:
    repo = str(repo_path)
    repo_id = repo_path.name[len("models--"):].replace("--", "/")
    model = LocalModel(repo_id=repo_id, cache_dir=str(cache_dir), repo_path=repo)
    refs_by_hash: dict[str, list[str]] = {}
    for path, rel, _link in _walk_files(repo + "/refs"):
        try:
            with open(path, encoding="utf-8") as fh:
                commit = fh.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        refs_by_hash.setdefault(commit, []).append(rel)
    blob_stats: dict[str, os.stat_result] = {}
    snaps = repo + "/snapshots"
    try:
        revs = sorted(e.name for e in os.scandir(snaps) if e.is_dir())
    except OSError:
        model.error = f"snapshots dir doesn't exist in cached repo: {snaps}"
        revs = []
    for rev in revs:
        rev_path = snaps + "/" + rev
        rev_blobs: set[str] = set()
        files: list[str] = []
        for fp, rel, is_link in _walk_files(rev_path):
            blob = fp
            if is_link:
                try:
                    blob = os.path.normpath(os.path.join(os.path.dirname(fp), os.readlink(fp)))
                except OSError:
                    pass
            if blob not in blob_stats:
                try:
                    blob_stats[blob] = os.stat(blob)
                except OSError:
                    model.error = f"blob missing (broken symlink): {blob}"
                    continue
            rev_blobs.add(blob)
            files.append(rel)
        last_mod = max((blob_stats[b].st_mtime for b in rev_blobs), default=None)
        if last_mod is None:
            try:
                last_mod = os.stat(rev_path).st_mtime
            except OSError:
                last_mod = 0.0
        model.revisions.append(Revision(
            commit_hash=rev, refs=sorted(refs_by_hash.pop(rev, [])),
            size_on_disk=sum(blob_stats[b].st_size for b in rev_blobs), nb_files=len(files),
            last_modified=last_mod, snapshot_path=rev_path, files=sorted(files)))
    if refs_by_hash and model.error is None:
        model.error = f"reference(s) refer to missing commit hashes: {sorted(refs_by_hash)}"
    model.nb_files = len(blob_stats)
    model.size_on_disk = sum(s.st_size for s in blob_stats.values())
    if blob_stats:
        model.last_accessed = max(s.st_atime for s in blob_stats.values())
        model.last_modified = max(s.st_mtime for s in blob_stats.values())
    else:
        with contextlib.suppress(OSError):
            st = os.stat(repo)
            model.last_accessed, model.last_modified = st.st_atime, st.st_mtime
    try:
        blob_names = os.listdir(repo + "/blobs")
    except OSError:
        blob_names = []
    done = {n for n in blob_names if not n.endswith(".incomplete")}
    for n in blob_names:
        # `<etag>.incomplete` (hub 0.x/1.x) or `<etag>.<id>.incomplete` (hub 2.x); one whose blob is complete is a
        # leftover of a killed download, not a missing file
        if n.endswith(".incomplete") and n.split(".", 1)[0] not in done:
            model.incomplete_files += 1
            with contextlib.suppress(OSError):
                model.incomplete_bytes += os.stat(repo + "/blobs/" + n).st_size
    snap = model.main_snapshot
    if snap:
        model.__dict__.update(read_config(snap))
        names = set()
        for rev in model.revisions:
            if rev.snapshot_path == snap:
                names = {os.path.basename(f) for f in rev.files}
        model.complete = ("config.json" in names and any(n.endswith(WEIGHT_SUFFIXES) for n in names)
                          and model.incomplete_files == 0 and model.error is None)
    return model


def scan(cache_dir: str | Path | None = None, source: str = "hf-cache") -> list[LocalModel]:
    """Every model repo in one cache directory; a missing directory is an empty list, not an error."""
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    try:
        entries = sorted(os.listdir(cache))
    except OSError:
        return []
    found = []
    for e in entries:
        if not e.startswith("models--") or e.count("--") < 2:
            continue
        p = cache / e
        if not p.is_dir():
            continue
        m = _scan_repo(p, cache)
        m.source = source
        found.append(m)
    return found


def list_models(extra_dirs: list[str] | None = None) -> list[LocalModel]:
    """The hub cache plus any other cache directories (e.g. the `--download-dir` engines were started with)."""
    main = hub_cache_dir()
    models = scan(main)
    seen = {os.path.realpath(main)}
    for d in extra_dirs or []:
        real = os.path.realpath(os.path.expanduser(d))
        if real in seen:
            continue
        seen.add(real)
        models.extend(scan(d, source="download-dir"))
    return models


# -------------------------------------------------------------------------------------------------- start preflight
class Preflight:
    """What `start MODEL` will find: the model cached (and where), or a download (and its size when knowable)."""

    def __init__(self, model: str, is_repo_id: bool) -> None:
        self.model = model
        self.is_repo_id = is_repo_id
        self.cached = False
        self.partial = False  # an interrupted download is in the cache
        self.cache_dir: str | None = None
        self.size_bytes: int | None = None  # on disk when cached, else the download (None: unknown)
        self.size_error: str | None = None  # why the download size is unknown

    def __repr__(self) -> str:
        return f"Preflight({self.__dict__!r})"


def is_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _snapshot_bytes(snap: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(snap):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, n)).st_size
    return total


DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def local_weights(model: str, download_dir: str | None = None) -> tuple[bool, int | None]:
    """(quantized, bytes the weights would take in float32) for a model found locally: a checkpoint directory, or a
    hub id complete in the HF cache (or `download_dir`). (False, None) when it is not local or cannot be read."""
    snap: Path | None = None
    p = Path(model).expanduser()
    if p.is_dir():
        snap = p
    elif model.count("/") == 1 and not model.startswith(("/", ".", "~")):
        caches = [hub_cache_dir()] + ([Path(download_dir).expanduser()] if download_dir else [])
        snap = next((snapshot_path(model, cache=c) for c in caches if is_cached(model, c)), None)
    if snap is None:
        return False, None
    cfg = read_config(snap)
    sizes: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(snap):
            if entry.name.endswith(WEIGHT_SUFFIXES):
                with contextlib.suppress(OSError):
                    sizes[entry.name] = entry.stat().st_size  # follows the snapshot's symlink into blobs/
    # a repo that ships both formats is loaded from its safetensors
    safetensors = [n for n in sizes if n.endswith(".safetensors")]
    weights = sum(sizes[n] for n in safetensors) if safetensors else sum(sizes.values())
    quantized = cfg.get("quantization") is not None
    if not weights or quantized:
        return quantized, None
    per_param = DTYPE_BYTES.get(str(cfg.get("torch_dtype") or "bfloat16"), 2)
    return False, weights * 4 // per_param


def preflight(model: str, download_dir: str | None = None, size_timeout: float = 5.0) -> Preflight:
    """Is `model` (a hub id) complete in the cache, or in `download_dir`? If not, how large is the download?

    With HF_HUB_OFFLINE set and no cached copy, raise UsageError: vLLM could only fail, after loading for a while.
    Paths and anything that is not ORG/NAME are left to vLLM (is_repo_id False).
    """
    from sage_llm.core.errors import UsageError

    if model.startswith(("/", ".", "~")) or model.count("/") != 1 or os.path.exists(model):
        return Preflight(model, is_repo_id=False)
    pre = Preflight(model, is_repo_id=True)
    caches = [hub_cache_dir()] + ([Path(download_dir).expanduser()] if download_dir else [])
    for cache in caches:
        if is_cached(model, cache):
            snap = snapshot_path(model, cache=cache)
            pre.cached, pre.cache_dir = True, str(cache)
            pre.size_bytes = _snapshot_bytes(snap) if snap else None
            return pre
        if repo_dir(model, cache).exists():
            pre.partial = True
    pre.cache_dir = str(caches[-1])
    if is_offline():
        where = " or ".join(str(c) for c in caches)
        raise UsageError(
            f"{model} is not in the local cache ({where}) and HF_HUB_OFFLINE is set, so vLLM cannot download it; "
            "nothing was started",
            hint=f"unset HF_HUB_OFFLINE to download it, or get it first: sage-llm models pull {model} "
                 "(or `sage-llm models import FILE.gguf --as ORG/NAME`)",
        )
    pre.size_bytes, pre.size_error = download_size(model, timeout=size_timeout)
    return pre


def download_size(model: str, revision: str = "main", timeout: float = 5.0) -> tuple[int | None, str | None]:
    """Bytes vLLM will fetch for `model` (safetensors weights if any, else .bin/.pt, plus the small files), from the
    hub's file listing; (None, reason) when the hub cannot tell in `timeout` seconds."""
    try:
        from huggingface_hub import HfApi

        endpoint = os.environ.get("HF_ENDPOINT") or None
        info = HfApi(endpoint=endpoint).model_info(model, revision=revision, files_metadata=True, timeout=timeout)
    except Exception as exc:  # offline, DNS, 401/404: the size is a nicety, vLLM reports the real error
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return None, f"hub answered {status}" if status else "hub not reachable"
    files = [(s.rfilename, s.size or 0) for s in (info.siblings or [])]
    st = [sz for n, sz in files if n.endswith(".safetensors")]
    if st:
        weights = sum(st)
    else:
        weights = sum(sz for n, sz in files if n.endswith((".bin", ".pt", ".pth")))
    small = sum(sz for n, sz in files if not n.endswith(WEIGHT_SUFFIXES + (".pth", ".h5", ".msgpack", ".onnx",
                                                                          ".ot", ".tflite")))
    return weights + small, None


def hub_download_size(model: str) -> int | None:
    """The download size the hub lists for `model` (None when it cannot tell): LoadProgress's size_lookup."""
    return download_size(model, timeout=10.0)[0]
