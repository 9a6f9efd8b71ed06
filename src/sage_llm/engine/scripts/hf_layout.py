"""Lay a directory of model files out as a Hugging Face hub cache entry (stdlib only).

  <cache>/models--ORG--NAME/blobs/<hash>          sha256 for weights (LFS files), git blob sha1 for the rest
  <cache>/models--ORG--NAME/refs/main             the commit id
  <cache>/models--ORG--NAME/snapshots/<commit>/F  relative symlinks into blobs/

`huggingface_hub.scan_cache_dir()`, `snapshot_download(local_files_only=True)`, transformers and vLLM (with
HF_HUB_OFFLINE=1) then find the model by its repo id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".msgpack", ".h5", ".onnx")


def _file_hash(path: Path, lfs: bool) -> str:
    h = hashlib.sha256() if lfs else hashlib.sha1()
    if not lfs:
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layout(src_dir: str | Path, cache_dir: str | Path, repo_id: str, move: bool = False) -> Path:
    """Copy (or move) every file under `src_dir` into the cache as `repo_id`; returns the snapshot directory."""
    src = Path(src_dir)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo id must be ORG/NAME, got {repo_id!r}")
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    hashes = {p: _file_hash(p, p.name.endswith(LFS_SUFFIXES)) for p in files}
    commit = hashlib.sha1("".join(f"{p.relative_to(src)}:{h}\n" for p, h in hashes.items()).encode()).hexdigest()
    blobs = repo / "blobs"
    snap = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for p, h in hashes.items():
        blob = blobs / h
        if not blob.exists():
            tmp = blobs / (h + ".tmp")
            (shutil.move if move else shutil.copyfile)(str(p), str(tmp))
            os.replace(tmp, blob)
        rel = p.relative_to(src)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(commit)
    return snap


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print("usage: hf_layout.py SRC_DIR HF_HUB_CACHE ORG/NAME", file=sys.stderr)
        sys.exit(2)
    print(layout(sys.argv[1], sys.argv[2], sys.argv[3]))
