"""The Hugging Face hub cache: where it is, and whether a model is complete in it (no huggingface_hub import here,
so `start` and completion stay fast; listing with sizes and metadata uses `huggingface_hub.scan_cache_dir`)."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def hub_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def repo_dir(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


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
        return not any(n.endswith(".incomplete") for n in os.listdir(blobs))
    except OSError:
        return True


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
