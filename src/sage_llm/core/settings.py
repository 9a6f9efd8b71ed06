"""Settings, resolved in this order (first one set wins):

  1. the command-line flag (the caller passes it in)
  2. the environment variable (SAGE_LOCAL_ENGINE_PORT, ...)
  3. `.env` in the current directory: only SAGE_* keys, and it never overrides the real environment
     (`SAGE_LLM_DOTENV` names another file; set it empty to read none)
  4. the TOML config file, `platformdirs.user_config_dir("sage")/llm.toml` (`SAGE_LLM_CONFIG` names another file)
  5. the built-in default

`SETTINGS` below is the one table of settings. Stdlib only and lazy (tomllib is imported only when the config file
exists), because `status --json`, which Studio polls, reads the local engine port through here.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

from sage_llm.core.errors import SageLLMError, UsageError
from sage_llm.core.records import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any

CONFIG_ENV = "SAGE_LLM_CONFIG"
DOTENV_ENV = "SAGE_LLM_DOTENV"
CONFIG_FILE_NAME = "llm.toml"


class Spec(Record, frozen=True):
    key: str  # name in the config file and in `sage-llm config set`
    env: str  # environment variable (also read from .env)
    kind: str  # port | fraction | seconds | text | url | host
    default: Any
    help: str
    secret: bool = False  # never printed: shown as set/unset
    flag: str | None = None  # the command-line flag that overrides it, for the docs


SETTINGS: tuple[Spec, ...] = (
    Spec("local_engine_port", "SAGE_LOCAL_ENGINE_PORT", "port", 8001,
         "Port of the local engine: `start` default, the engine Studio and `chat` use.", flag="start --port"),
    Spec("default_model", "SAGE_LOCAL_ENGINE_DEFAULT_MODEL", "text", "Qwen/Qwen2.5-7B-Instruct",
         "Model `start` serves when none is given.", flag="start MODEL"),
    Spec("gpu_util", "SAGE_LOCAL_ENGINE_GPU_UTIL", "fraction", 0.9,
         "Fraction of GPU memory an engine may use, in (0, 1].", flag="start --gpu-memory-utilization"),
    Spec("host", "SAGE_LOCAL_ENGINE_HOST", "host", "127.0.0.1",
         "Address engines bind to; anything but loopback needs an API key.", flag="start --host"),
    Spec("start_timeout", "SAGE_LLM_STARTUP_TIMEOUT", "seconds", 900.0,
         "Seconds `start` waits for the engine to serve the model.", flag="start --timeout"),
    Spec("stop_timeout", "SAGE_LLM_STOP_TIMEOUT", "seconds", 30.0,
         "Seconds `stop` waits after SIGTERM before SIGKILL.", flag="stop --timeout"),
    Spec("cluster", "SAGE_LLM_CLUSTER", "text", None,
         "Ray cluster (HOST:PORT of its head) `start` places engines on; unset: this machine.",
         flag="start --cluster"),
    Spec("chat_base_url", "SAGE_CHAT_BASE_URL", "url", None,
         "OpenAI-compatible base URL `chat` uses for the cloud source."),
    Spec("chat_model", "SAGE_CHAT_MODEL", "text", None, "Model `chat` asks the cloud source for."),
    Spec("chat_api_key", "SAGE_CHAT_API_KEY", "text", None, "API key for the cloud source.", secret=True),
)
BY_KEY = {s.key: s for s in SETTINGS}
TABLES = ("gateway",)  # tables other modules read (sage_llm/gateway/options.py); not settings, kept on rewrite
BY_ENV = {s.env: s for s in SETTINGS}
SOURCES = ("flag", "env", "dotenv", "config", "default")


class ConfigError(UsageError):
    """A setting has a bad value, or the config file cannot be read."""


class Resolved(Record, frozen=True):
    spec: Spec
    value: Any  # parsed value (None when unset)
    source: str  # one of SOURCES
    origin: str | None  # the variable or file it came from
    error: str | None = None  # set only by resolve_all(): the value was invalid

    @property
    def key(self) -> str:
        return self.spec.key

    def where(self) -> str:
        return {"flag": "command-line flag", "env": f"environment ({self.origin})", "dotenv": f".env ({self.origin})",
                "config": f"config file ({self.origin})", "default": "built-in default"}[self.source]


# ---------------------------------------------------------------- files

def config_path() -> Path:
    override = os.environ.get(CONFIG_ENV)
    if override and override.strip():
        return Path(override.strip()).expanduser()
    if sys.platform.startswith("linux"):  # what platformdirs.user_config_dir("sage") gives, without importing it
        xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
        return Path(xdg or os.path.expanduser("~/.config")) / "sage" / CONFIG_FILE_NAME
    import platformdirs

    return Path(platformdirs.user_config_dir("sage")) / CONFIG_FILE_NAME


def dotenv_path() -> Path | None:
    override = os.environ.get(DOTENV_ENV)
    if override is not None:
        return Path(override).expanduser() if override.strip() else None
    try:
        return Path.cwd() / ".env"
    except OSError:  # the current directory was deleted
        return None


_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def _cached(path: Path, parse: Any) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(str(path))
    if hit and hit[0] == stamp:
        return hit[1]
    data = parse(path)
    _cache[str(path)] = (stamp, data)
    return data


def parse_dotenv(text: str) -> dict[str, str]:
    """KEY=VALUE lines (optionally `export KEY=...`, quoted values, `#` comments); only SAGE_* keys are kept."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if not m or not m.group(1).startswith("SAGE_"):
            continue
        value = m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        out[m.group(1)] = value
    return out


def read_dotenv() -> tuple[Path | None, dict[str, str]]:
    path = dotenv_path()
    if path is None:
        return None, {}

    def parse(p: Path) -> dict[str, str]:
        try:
            return parse_dotenv(p.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return {}

    return path, _cached(path, parse)


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The config file as a dict ({} when it does not exist); ConfigError when it is not valid TOML."""
    path = path or config_path()

    def parse(p: Path) -> dict[str, Any]:
        try:
            import tomllib  # type: ignore[import-not-found,unused-ignore]
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
        try:
            with open(p, "rb") as fh:
                return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}",
                              hint=f"fix or remove it (`sage-llm config set` rewrites it); {CONFIG_ENV} names "
                                   "another file") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None

    return _cached(path, parse)


# ---------------------------------------------------------------- values

def parse_value(spec: Spec, raw: Any, where: str) -> Any:
    """The typed value of `raw` for `spec`; ConfigError naming `where` when it is invalid."""
    def bad(why: str, example: str) -> ConfigError:
        shown = "(secret)" if spec.secret else repr(raw)
        prefix = f"{where}: " if where else ""
        return ConfigError(f"{prefix}{spec.key} = {shown} {why}", hint=f"set e.g. {example}")

    if isinstance(raw, bool):
        raise bad("is not valid", str(spec.default))
    text = str(raw).strip()
    if spec.kind == "port":
        if isinstance(raw, float) or not text.isdigit() or not 1 <= int(text) <= 65535:
            raise bad("is not a port number (1-65535)", "8001")
        return int(text)
    if spec.kind in ("fraction", "seconds"):
        try:
            num = float(text)
        except ValueError:
            raise bad("is not a number", str(spec.default)) from None
        if spec.kind == "fraction" and not 0 < num <= 1:
            raise bad("is not in (0, 1]", "0.9")
        if spec.kind == "seconds" and not num > 0:
            raise bad("is not a positive number of seconds", str(spec.default))
        return num
    if not text:
        raise bad("is empty", spec.default or "a value")
    if spec.kind == "url" and not re.match(r"^https?://[^\s/]+", text):
        raise bad("is not an http(s) URL", "https://api.openai.com/v1")
    if spec.kind == "host" and any(c.isspace() for c in text):
        raise bad("is not a host name or address", "127.0.0.1")
    return text


def spec_for(key: str) -> Spec:
    spec = BY_KEY.get(key) or BY_ENV.get(key)
    if spec is None:
        raise UsageError(f"unknown setting {key!r}", hint="known settings: " + ", ".join(BY_KEY))
    return spec


def _layers(spec: Spec) -> tuple[str, str | None, Any] | None:
    """(source, origin, raw) of the first layer below the flag that sets `spec`, or None."""
    raw = os.environ.get(spec.env)
    if raw is not None and raw.strip():
        return "env", spec.env, raw
    path, dot = read_dotenv()
    if dot.get(spec.env, "").strip():
        return "dotenv", str(path), dot[spec.env]
    cfg_path = config_path()
    cfg = read_config(cfg_path)
    if spec.key in cfg:
        return "config", str(cfg_path), cfg[spec.key]
    return None


def resolve(key: str, flag: Any = None) -> Resolved:
    """The effective value of one setting and where it came from; ConfigError when that value is invalid."""
    spec = spec_for(key)
    if flag is not None:
        return Resolved(spec, flag, "flag", None)
    layer = _layers(spec)
    if layer is None:
        return Resolved(spec, spec.default, "default", None)
    source, origin, raw = layer
    where = {"env": f"environment variable {origin}", "dotenv": f"{origin} ({spec.env})",
             "config": f"config file {origin}"}[source]
    return Resolved(spec, parse_value(spec, raw, where), source, origin)


def get(key: str, flag: Any = None) -> Any:
    """The effective value of one setting (the flag wins when it is not None)."""
    return resolve(key, flag).value


def resolve_all() -> tuple[list[Resolved], list[str]]:
    """Every setting, resolved; an invalid value is reported in `error` rather than raised. Plus warnings."""
    out: list[Resolved] = []
    for spec in SETTINGS:
        try:
            out.append(resolve(spec.key))
        except ConfigError as exc:
            layer = _layers(spec)
            out.append(Resolved(spec, None, layer[0] if layer else "default", layer[1] if layer else None,
                                error=exc.message))
    warnings = [f"config file {config_path()}: unknown setting {k!r} is ignored"
                for k in read_config() if k not in BY_KEY and k not in TABLES]
    return out, warnings


def layered_env(name: str) -> str | None:
    """For `config.env_str`: the value of variable `name` from .env, else from the config file, else None.

    Lets every reader of a SAGE_* variable honour .env and the config file without knowing about them.
    """
    if not name.startswith("SAGE_"):
        return None
    _, dot = read_dotenv()
    if dot.get(name, "").strip():
        return dot[name].strip()
    return config_value(name)


def source_of(name: str) -> tuple[str, str | None] | None:
    """(source, origin) of the layer that sets variable `name` (env, dotenv or config, as `env_str` reads it), or
    None when unset. Only SAGE_* settings have the lower layers; any other variable is env or None."""
    spec = BY_ENV.get(name)
    if spec is None:
        raw = os.environ.get(name)
        return ("env", name) if raw is not None and raw.strip() else None
    layer = _layers(spec)
    return (layer[0], layer[1]) if layer else None


def config_value(name: str) -> str | None:
    """The config file's value for variable `name` (stripped text), ignoring the environment and .env."""
    spec = BY_ENV.get(name)
    value = read_config().get(spec.key) if spec is not None else None
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value).strip() or None


# ---------------------------------------------------------------- writing

def _toml_scalar(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a valid TOML basic string


def _toml_key(k: str) -> str:
    return k if re.match(r"^[A-Za-z0-9_-]+$", k) else _toml_scalar(k)


def _toml_table(keys: list[str], table: dict[str, Any]) -> str:
    """A table (e.g. [gateway] with its [gateway.models."ORG/NAME"] sub-tables) written back as TOML."""
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    out = f"\n[{'.'.join(_toml_key(k) for k in keys)}]\n"
    for k, v in scalars.items():
        value = "[" + ", ".join(_toml_scalar(x) for x in v) + "]" if isinstance(v, list) else _toml_scalar(v)
        out += f"{_toml_key(k)} = {value}\n"
    for k, v in table.items():
        if isinstance(v, dict):
            out += _toml_table([*keys, k], v)
    return out


def write_config(data: dict[str, Any], path: Path | None = None) -> Path:
    """Write the flat key = value config file atomically, mode 0600 (directory created 0700)."""
    path = path or config_path()
    tables = {k: v for k, v in data.items() if k in TABLES and isinstance(v, dict)}
    for k, v in data.items():
        if k in tables:
            continue
        if isinstance(v, (dict, list)) or not re.match(r"^[A-Za-z0-9_-]+$", k):
            raise ConfigError(f"config file {path} holds {k!r}, which `config set` cannot rewrite",
                              hint="edit the file by hand")
    body = "# sage-llm settings (`sage-llm config show` explains them). Written by `sage-llm config set`.\n"
    body += "".join(f"{k} = {_toml_scalar(v)}\n" for k, v in sorted(data.items()) if k not in tables)
    for k, v in sorted(tables.items()):
        body += _toml_table([k], v)
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise SageLLMError(f"cannot write config file {path}: {exc.strerror}",
                           hint=f"check the directory's permissions, or set {CONFIG_ENV}") from exc
    _cache.pop(str(path), None)
    return path


def set_value(key: str, raw: str) -> tuple[Spec, Any, Path]:
    """Validate `raw` for setting `key` and store it in the config file."""
    spec = spec_for(key)
    value = parse_value(spec, raw, "")
    path = config_path()
    data = dict(read_config(path))
    data[spec.key] = value
    return spec, value, write_config(data, path)


def unset_value(key: str) -> tuple[Spec, bool, Path]:
    """Remove setting `key` from the config file; (spec, whether it was there, path)."""
    spec = spec_for(key)
    path = config_path()
    data = dict(read_config(path))
    present = data.pop(spec.key, None) is not None
    if present:
        write_config(data, path)
    return spec, present, path
