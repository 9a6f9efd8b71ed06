"""Where state lives: `SAGE_LLM_HOME`, else `platformdirs.user_state_dir("sage")/llm`.

Layout:
  engines/<name>.json   one record per engine (0600)
  logs/<name>.log       engine stdout+stderr (0600)
  engine-env.json       the installed engine environment
  envs/<kind>/          default place for engine environments
  audit.jsonl           one line per state-changing operation
  .lock                 file lock serialising mutations
The directory is 0700; a home that is a symlink or owned by another user is refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sage_llm.core.config import EnvVars
from sage_llm.core.errors import StateError


def home() -> Path:
    override = os.environ.get(EnvVars.HOME)
    if override:
        return Path(override).expanduser()
    import platformdirs  # lazy: keeps the fast paths fast

    return Path(platformdirs.user_state_dir("sage")) / "llm"


def engines_dir(root: Path | None = None) -> Path:
    return (root or home()) / "engines"


def logs_dir(root: Path | None = None) -> Path:
    return (root or home()) / "logs"


def check_private_dir(path: Path) -> None:
    """Refuse a state directory that is a symlink or owned by someone else; tighten its mode to 0700."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StateError(
            f"state directory {path} is a symlink; refusing to use it",
            hint=f"remove the link or point {EnvVars.HOME} at a real directory you own",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"state path {path} is not a directory", hint=f"remove it or set {EnvVars.HOME}")
    if st.st_uid != os.getuid():
        raise StateError(
            f"state directory {path} is owned by uid {st.st_uid}, not you (uid {os.getuid()})",
            hint=f"set {EnvVars.HOME} to a directory of your own",
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise StateError(f"cannot make {path} private: {exc.strerror}") from exc


def ensure_home(root: Path | None = None) -> Path:
    """Create (0700) and check the state directory and its sub-directories."""
    root = root or home()
    check_private_dir(root)
    try:
        old = os.umask(0o077)
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            for sub in (engines_dir(root), logs_dir(root)):
                sub.mkdir(exist_ok=True, mode=0o700)
        finally:
            os.umask(old)
    except OSError as exc:
        raise StateError(
            f"cannot create state directory {root}: {exc.strerror}",
            hint=f"check its permissions and free space, or set {EnvVars.HOME}",
        ) from exc
    check_private_dir(root)
    for sub in (engines_dir(root), logs_dir(root)):
        check_private_dir(sub)
    return root


# ---- the Hugging Face hub cache's layout (models/hf_cache.py reads it; observe/progress.py watches downloads in it)
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
