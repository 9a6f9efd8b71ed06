"""The tiny test model: built offline by `build_tiny_model.py` (beside this file) with an engine venv's python.

The model answers every short chat prompt, under greedy decoding, with exactly `TINY_REPLY`. It is laid out as a
Hugging Face cache entry, so vLLM (with HF_HUB_OFFLINE=1) and `sage llm start REPO_ID` find it by repo id.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from pathlib import Path

from sage_llm.core.errors import SageLLMError

TINY_REPO = "sage-test/tiny-chat"
TINY_REPLY = "Hello from the tiny SAGE test model."
# bump when build_tiny_model.py changes what it trains: a cache built by an older builder is then not reused
BUILD = 2
CACHE_NAME = f"tiny-hub-{BUILD}"  # under the repository's .cache/
SCRIPT = Path(__file__).resolve().parent / "build_tiny_model.py"


def _hf_layout_dir() -> Path:
    """Where the package keeps hf_layout.py (the HF cache layout the builder writes with): run by the engine's python,
    which does not have sage_llm installed."""
    import sage_llm.engine.scripts as scripts

    return Path(scripts.__file__).resolve().parent


def snapshot(cache_dir: str | Path, repo_id: str = TINY_REPO) -> Path | None:
    """The complete snapshot of `repo_id` in `cache_dir`, or None."""
    from sage_llm.models import hf_cache

    cache = Path(cache_dir)
    if not hf_cache.is_cached(repo_id, cache):
        return None
    snap = hf_cache.snapshot_path(repo_id, cache=cache)
    if snap is None or not (snap / "tokenizer.json").exists():
        return None
    return snap


def build_tiny_model(cache_dir: str | Path, python: str | Path, repo_id: str = TINY_REPO,
                     timeout: float = 1800.0) -> Path:
    """Build the tiny model into the hub cache `cache_dir` with `python` (needs torch, transformers, tokenizers).

    Returns the snapshot directory. Does nothing when the snapshot is already complete; concurrent callers are
    serialised with a lock file in the cache, so two test sessions never build it twice at once.
    """
    cache = Path(cache_dir).expanduser().absolute()
    found = snapshot(cache, repo_id)
    if found is not None:
        return found
    if not Path(python).exists():
        raise SageLLMError(f"cannot build the tiny model: {python} does not exist",
                           hint="run `sage llm engine install --cpu` (or `make engine`) first")
    cache.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(cache / ".tiny-model.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        found = snapshot(cache, repo_id)  # someone else may have built it while we waited
        if found is not None:
            return found
        try:
            proc = subprocess.run([str(python), str(SCRIPT), "--cache", str(cache), "--repo", repo_id],
                                  capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                                       "PYTHONPATH": str(_hf_layout_dir())})
        except subprocess.TimeoutExpired as exc:
            raise SageLLMError(f"building the tiny model took more than {timeout:g} s") from exc
        except OSError as exc:
            raise SageLLMError(f"cannot run {python}: {exc.strerror}") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise SageLLMError(f"building the tiny model failed (exit {proc.returncode}):\n{tail}",
                               hint="the engine environment needs torch, transformers and tokenizers")
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    found = snapshot(cache, repo_id)
    if found is None:
        raise SageLLMError(f"the tiny model build finished but {repo_id} is not complete in {cache}")
    return found
