"""Gateway options and per-model profiles. Stdlib only (the status path reads the gateway record through daemon.py).

Precedence like every other setting: flag > environment (SAGE_LLM_GATEWAY_*) > config file `[gateway]` > default.
Per-model profiles live in the config file:

    [gateway.models."Qwen/Qwen2.5-1.5B-Instruct"]
    args = ["--max-model-len", "4096"]     # extra vLLM arguments, verbatim
    gpu_memory_utilization = 0.5
    ttl = "30m"                            # idle time before the engine is stopped ("0" = never)
    pinned = true                          # never unloaded (TTL or eviction)
    aliases = ["qwen", "small"]            # other names clients may use
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from sage_llm.core.addresses import is_loopback
from sage_llm.core.errors import UsageError

DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VIRTUAL_MODELS = ("auto", "local", "cloud")


def parse_duration(raw: Any, what: str = "--ttl") -> float:
    """Seconds for '300', '300s', '5m', '1.5h', '0' (0 = never); UsageError otherwise."""
    if isinstance(raw, bool):
        raise UsageError(f"{what} {raw!r} is not a duration", hint="e.g. 5m, 300s, 1h, or 0 for never")
    if isinstance(raw, (int, float)):
        if raw < 0:
            raise UsageError(f"{what} {raw!r} is negative", hint="e.g. 5m, 300s, 1h, or 0 for never")
        return float(raw)
    m = DURATION_RE.match(str(raw))
    if not m:
        raise UsageError(f"{what} {raw!r} is not a duration", hint="e.g. 5m, 300s, 1h, or 0 for never")
    return float(m.group(1)) * UNITS[m.group(2)]


@dataclass
class Profile:
    """How to start one model, and how to treat its engine."""

    model: str
    args: list[str] = field(default_factory=list)
    gpu_memory_utilization: float | None = None
    quantization: str | None = None
    max_model_len: str | None = None
    ttl: float | None = None  # None: the gateway's --ttl
    pinned: bool = False
    aliases: list[str] = field(default_factory=list)
    configured: bool = False  # from the config file (else: cached model, or last-used flags)
    settings: dict[str, Any] = field(default_factory=dict)  # last-used launch settings of a previous engine
    min_replicas: int = 1  # engines kept while the model is in use (`replicas = N` sets both)
    max_replicas: int = 1  # engines the gateway may scale out to under load
    capacity: int | None = None  # requests one engine serves at once (vLLM's max_num_seqs); None: from args, or 256
    replica: int = 1  # which replica this profile starts (1 = the model's first engine); set by the machine
    node: str | None = None  # with --cluster: the node its engines go to (as `start --node`); None: Ray chooses

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "args": self.args, "gpu_memory_utilization": self.gpu_memory_utilization,
                "quantization": self.quantization, "ttl": self.ttl, "pinned": self.pinned, "aliases": self.aliases,
                "configured": self.configured, "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "node": self.node}

    @property
    def replicated(self) -> bool:
        return self.max_replicas > 1

    @property
    def slots(self) -> int:
        """The highest replica number used: past max_replicas when replicas held failed were replaced."""
        return self.max_replicas + 2 * self.min_replicas

    def engine_name(self) -> str | None:
        """The engine name a replicated model's engines get (`NAME`, `NAME-r2`, ...), so that a second replica is
        never mistaken for the first (a start without a name returns the engine already serving the model) and a
        restarted gateway finds each replica again; None for a model with one engine (the usual name)."""
        if not self.replicated:
            return None
        from sage_llm.engine.targets import slug

        return slug(self.model) + ("" if self.replica <= 1 else f"-r{self.replica}")

    def seqs(self) -> int:
        """Requests one engine serves at once: `capacity`, else --max-num-seqs in args, else vLLM's default."""
        if self.capacity:
            return self.capacity
        args = list(self.args) or list((self.settings or {}).get("extra_args") or [])
        for i, a in enumerate(args):
            if a.startswith("--max-num-seqs="):
                return max(1, int(a.split("=", 1)[1])) if a.split("=", 1)[1].isdigit() else DEFAULT_SEQS
            if a == "--max-num-seqs" and i + 1 < len(args) and args[i + 1].isdigit():
                return max(1, int(args[i + 1]))
        return DEFAULT_SEQS


DEFAULT_SEQS = 256  # vLLM's default max_num_seqs


def parse_replicas(raw: Any, what: str) -> tuple[int, int]:
    """`N` or `MIN:MAX` (1 <= MIN <= MAX <= 64) -> (min, max); UsageError naming `what` otherwise."""
    text = str(raw).strip()
    m = re.fullmatch(r"(\d+)(?::(\d+))?", text) if not isinstance(raw, bool) else None
    lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if not m or not 1 <= lo <= hi <= MAX_REPLICAS:
        raise UsageError(f"{what} {raw!r} is not a replica count",
                         hint=f"give N or MIN:MAX with 1 <= MIN <= MAX <= {MAX_REPLICAS}, e.g. 2 or 1:4")
    return lo, hi


MAX_REPLICAS = 64
CLUSTER_KEY_ENV = "SAGE_LLM_CLUSTER_KEY"


@dataclass
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 8901
    ttl: float = 900.0  # idle seconds before an engine the gateway started is stopped; 0 = never
    max_engines: int = 0  # 0 = no count limit (memory still limits)
    api_key_env: str | None = None
    fallback: bool = True  # models the local side cannot serve go to the cloud (SAGE_CHAT_BASE_URL)
    engine_port: int = 8902
    max_queue: int = 64  # requests waiting for loads, in all; past it 503 + Retry-After
    max_body: int = 32 * 1024 * 1024
    load_timeout: float = 900.0
    stop_engines_on_exit: bool = True
    sleep: bool = False  # GPU only: put evicted engines to sleep (level 1) instead of stopping them
    upstreams: dict[str, str] = field(default_factory=dict)  # MODEL -> base URL (static routes)
    external: bool = True  # also route to vLLM servers sage-llm did not start (found like `status` finds them)
    allowed_origins: list[str] = field(default_factory=list)
    refresh_s: float = 2.0
    tick_s: float = 1.0
    profiles: dict[str, Profile] = field(default_factory=dict)
    tls_cert: str | None = None  # PEM certificate (chain) and private key files: serve HTTPS
    tls_key: str | None = None
    replicas: dict[str, str] = field(default_factory=dict)  # MODEL -> "N" or "MIN:MAX" (--replicas: over the config)
    scale_out_waiting: float = 1.0  # waiting requests per replica that, held for scale_out_s, start one more
    scale_out_s: float = 3.0
    cluster: str | None = None  # HOST:PORT of a Ray head: loads are placed on the cluster's nodes
    cluster_key_env: str = CLUSTER_KEY_ENV  # the engines' key on the nodes: read there, never sent through Ray
    place_s: float = 5.0  # with --cluster: seconds Ray may take to place an engine before the gateway makes room

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "ttl": self.ttl, "max_engines": self.max_engines,
                "api_key_env": self.api_key_env, "fallback": self.fallback, "engine_port": self.engine_port,
                "max_queue": self.max_queue, "max_body": self.max_body, "load_timeout": self.load_timeout,
                "stop_engines_on_exit": self.stop_engines_on_exit, "sleep": self.sleep,
                "upstreams": self.upstreams, "allowed_origins": self.allowed_origins, "external": self.external,
                "tls_cert": self.tls_cert, "tls_key": self.tls_key, "replicas": self.replicas,
                "cluster": self.cluster, "cluster_key_env": self.cluster_key_env, "place_s": self.place_s,
                "scale_out_waiting": self.scale_out_waiting, "scale_out_s": self.scale_out_s}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GatewayOptions:
        known = set(cls.__dataclass_fields__) - {"profiles"}
        opts = cls(**{k: v for k, v in data.items() if k in known})
        opts.profiles = read_profiles()
        apply_replicas(opts)
        return opts

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def tls_context(self) -> Any:
        """An ssl.SSLContext for the listening socket, or None (plain HTTP). UsageError for unusable files."""
        if not self.tls_cert or not self.tls_key:
            return None
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--tls-cert {self.tls_cert} / --tls-key {self.tls_key} cannot be used: "
                             f"{getattr(exc, 'strerror', None) or exc}",
                             hint="give a PEM certificate and its private key (readable by you)") from None
        return ctx

    def cleartext_warning(self) -> str | None:
        """The one warning for a gateway reachable beyond loopback without TLS."""
        if self.loopback or self.tls_cert:
            return None
        return (f"the gateway on {self.host} serves plain HTTP: keys travel in clear text on the network "
                f"(pass --tls-cert/--tls-key, or put a TLS proxy in front)")


def apply_replicas(opts: GatewayOptions) -> None:
    """--replicas MODEL=N|MIN:MAX onto the profiles (a model without a config table gets one of its own)."""
    for model, raw in opts.replicas.items():
        lo, hi = parse_replicas(raw, f"--replicas {model}=")
        p = opts.profiles.get(model)
        if p is None:
            p = opts.profiles[model] = Profile(model=model)
        p.min_replicas, p.max_replicas = lo, hi


def _has_keys() -> bool:
    from sage_llm.gateway import keys  # a key file is what makes a gateway shared (keys.KeyRing.active)

    return keys.path().exists()


def _gateway_table() -> dict[str, Any]:
    from sage_llm.core import settings

    table = settings.read_config().get("gateway") or {}
    if not isinstance(table, dict):
        raise UsageError(f"config file {settings.config_path()}: [gateway] must be a table",
                         hint='e.g. [gateway] then ttl = "15m"')
    return table


def read_profiles() -> dict[str, Profile]:
    """`[gateway.models."ORG/NAME"]` tables of the config file; UsageError naming the bad key."""
    from sage_llm.core import settings

    models = _gateway_table().get("models") or {}
    out: dict[str, Profile] = {}
    where = f"config file {settings.config_path()}"
    if not isinstance(models, dict):
        raise UsageError(f"{where}: [gateway.models] must be a table of model tables",
                         hint='e.g. [gateway.models."Qwen/Qwen2.5-1.5B-Instruct"]')
    for model, t in models.items():
        if not isinstance(t, dict):
            raise UsageError(f"{where}: gateway.models.{model!r} must be a table", hint="see docs/gateway.md")
        p = Profile(model=model, configured=True)
        args = t.get("args", [])
        if isinstance(args, str):
            import shlex

            args = shlex.split(args)
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise UsageError(f"{where}: gateway.models.{model!r}.args must be a list of strings",
                             hint='e.g. args = ["--max-model-len", "4096"]')
        p.args = list(args)
        if "gpu_memory_utilization" in t:
            u = t["gpu_memory_utilization"]
            if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
                raise UsageError(f"{where}: gateway.models.{model!r}.gpu_memory_utilization = {u!r} is not in (0, 1]",
                                 hint="e.g. gpu_memory_utilization = 0.5")
            p.gpu_memory_utilization = float(u)
        if "ttl" in t:
            p.ttl = parse_duration(t["ttl"], f"gateway.models.{model!r}.ttl")
        p.pinned = bool(t.get("pinned", False))
        aliases = t.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise UsageError(f"{where}: gateway.models.{model!r}.aliases must be a list of names",
                             hint='e.g. aliases = ["qwen"]')
        if any(a in VIRTUAL_MODELS for a in aliases):
            raise UsageError(f"{where}: gateway.models.{model!r}.aliases uses a reserved name "
                             f"({', '.join(VIRTUAL_MODELS)})", hint="pick another alias")
        p.aliases = aliases
        for key in ("quantization", "max_model_len"):
            if key in t:
                setattr(p, key, str(t[key]))
        if "replicas" in t:
            p.min_replicas, p.max_replicas = parse_replicas(t["replicas"],
                                                            f"{where}: gateway.models.{model!r}.replicas =")
        if "min_replicas" in t or "max_replicas" in t:
            lo = t.get("min_replicas", 1)
            hi = t.get("max_replicas", max(lo, 1) if isinstance(lo, int) else lo)
            p.min_replicas, p.max_replicas = parse_replicas(f"{lo}:{hi}", f"{where}: gateway.models.{model!r}."
                                                            "min_replicas:max_replicas =")
        if "node" in t:
            if not isinstance(t["node"], str) or not t["node"].strip():
                raise UsageError(f"{where}: gateway.models.{model!r}.node = {t['node']!r} is not a node name",
                                 hint='a node id, address, hostname or custom resource, e.g. node = "gpu-box-2"')
            p.node = t["node"].strip()
        if "capacity" in t:
            c = t["capacity"]
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise UsageError(f"{where}: gateway.models.{model!r}.capacity = {c!r} is not a positive whole number",
                                 hint="the engine's --max-num-seqs, e.g. capacity = 64")
            p.capacity = c
        out[model] = p
    return out


def resolve(host: str | None = None, port: int | None = None, ttl: str | None = None,
            max_engines: int | None = None, api_key_env: str | None = None, fallback: bool | None = None,
            upstreams: list[str] | None = None, engine_port: int | None = None, sleep: bool | None = None,
            keep_engines: bool | None = None, max_queue: int | None = None,
            allowed_origins: list[str] | None = None, external: bool | None = None, tls_cert: str | None = None,
            tls_key: str | None = None, replicas: list[str] | None = None, cluster: str | None = None,
            cluster_key_env: str | None = None) -> GatewayOptions:
    """Flags (None = not given) > SAGE_LLM_GATEWAY_* env > [gateway] in the config file > defaults; validated.
    Raises UsageError (exit 2) naming the bad value before anything starts."""
    table = _gateway_table()

    def pick(flag: Any, env: str, key: str, default: Any) -> Any:
        if flag is not None:
            return flag
        raw = os.environ.get(env)
        if raw is not None and raw.strip():
            return raw.strip()
        if key in table:
            return table[key]
        return default

    def as_int(raw: Any, what: str, lo: int, hi: int) -> int:
        try:
            if isinstance(raw, bool):
                raise ValueError
            value = int(str(raw).strip())
        except ValueError:
            raise UsageError(f"{what} {raw!r} is not a whole number", hint=f"give a number from {lo} to {hi}") \
                from None
        if not lo <= value <= hi:
            raise UsageError(f"{what} {value} is out of range", hint=f"give a number from {lo} to {hi}")
        return value

    opts = GatewayOptions()
    opts.host = str(pick(host, "SAGE_LLM_GATEWAY_HOST", "host", "127.0.0.1"))
    if not opts.host or any(c.isspace() for c in opts.host):
        raise UsageError(f"--host {opts.host!r} is not an address", hint="e.g. --host 127.0.0.1")
    opts.port = as_int(pick(port, "SAGE_LLM_GATEWAY_PORT", "port", 8901), "--port", 1, 65535)
    opts.ttl = parse_duration(pick(ttl, "SAGE_LLM_GATEWAY_TTL", "ttl", "15m"))
    opts.max_engines = as_int(pick(max_engines, "SAGE_LLM_GATEWAY_MAX_ENGINES", "max_engines", 0),
                              "--max-engines", 0, 1000)
    opts.engine_port = as_int(pick(engine_port, "SAGE_LLM_GATEWAY_ENGINE_PORT", "engine_port", 8902),
                              "--engine-port", 1, 65535)
    opts.max_queue = as_int(pick(max_queue, "SAGE_LLM_GATEWAY_MAX_QUEUE", "max_queue", 64), "--max-queue", 1,
                            100000)
    fb = pick(fallback, "SAGE_LLM_GATEWAY_FALLBACK", "fallback", True)
    opts.fallback = fb if isinstance(fb, bool) else str(fb).lower() in ("1", "true", "yes", "on")
    sl = pick(sleep, "SAGE_LLM_GATEWAY_SLEEP", "sleep", False)
    opts.sleep = sl if isinstance(sl, bool) else str(sl).lower() in ("1", "true", "yes", "on")
    ex = pick(external, "SAGE_LLM_GATEWAY_EXTERNAL", "external", True)
    opts.external = ex if isinstance(ex, bool) else str(ex).lower() in ("1", "true", "yes", "on")
    if keep_engines is not None:
        opts.stop_engines_on_exit = not keep_engines
    opts.api_key_env = pick(api_key_env, "SAGE_LLM_GATEWAY_API_KEY_ENV", "api_key_env", None)
    if opts.api_key_env is not None:
        if not VAR_RE.match(opts.api_key_env):
            raise UsageError(f"--api-key-env {opts.api_key_env!r} is not a variable name",
                             hint="give the NAME of an environment variable holding the key, e.g. SAGE_GATEWAY_KEY")
        if not os.environ.get(opts.api_key_env):
            raise UsageError(f"--api-key-env names {opts.api_key_env}, which is not set or empty",
                             hint=f"export {opts.api_key_env}=... first")
    if not opts.loopback and not opts.api_key_env and not _has_keys():
        raise UsageError(f"--host {opts.host} would let anyone who can reach this machine use the gateway",
                         hint="add keys first (sage-llm gateway keys add NAME) or pass --api-key-env VAR, or keep "
                              "the default 127.0.0.1")
    opts.tls_cert = pick(tls_cert, "SAGE_LLM_GATEWAY_TLS_CERT", "tls_cert", None)
    opts.tls_key = pick(tls_key, "SAGE_LLM_GATEWAY_TLS_KEY", "tls_key", None)
    if bool(opts.tls_cert) != bool(opts.tls_key):
        raise UsageError("--tls-cert and --tls-key go together", hint="give both files (PEM), or neither")
    opts.tls_context()  # the files checked now, before anything starts
    for item in upstreams or list(table.get("upstreams", {}).items() if isinstance(table.get("upstreams"), dict)
                                  else []):
        model, url = item if isinstance(item, tuple) else (str(item).split("=", 1) + [""])[:2]
        if not model or not re.match(r"^https?://[^\s/]+", url or ""):
            raise UsageError(f"--upstream {item!r} is not MODEL=URL", hint="e.g. --upstream my-model=http://127.0.0.1:9000/v1")
        if model in VIRTUAL_MODELS:
            raise UsageError(f"--upstream {model!r}: {model} is a reserved model name", hint="pick another name")
        opts.upstreams[model] = url.rstrip("/")
    opts.allowed_origins = list(allowed_origins or table.get("allowed_origins", []) or [])
    env_origins = os.environ.get("SAGE_LLM_GATEWAY_ORIGINS", "")
    opts.allowed_origins += [o.strip() for o in env_origins.split(",") if o.strip()]
    from sage_llm.core import settings

    opts.load_timeout = float(settings.get("start_timeout"))  # SAGE_LLM_STARTUP_TIMEOUT, as `start` waits
    opts.profiles = read_profiles()
    for item in replicas or []:
        model, _, count = str(item).partition("=")
        if not model or not count:
            raise UsageError(f"--replicas {item!r} is not MODEL=N", hint="e.g. --replicas Qwen/Qwen2.5-0.5B-Instruct=2 "
                             "(or MODEL=MIN:MAX to scale with load)")
        parse_replicas(count, f"--replicas {model}=")
        opts.replicas[model] = count
    apply_replicas(opts)
    raw = pick(None, "SAGE_LLM_GATEWAY_SCALE_OUT_WAITING", "scale_out_waiting", 1.0)
    try:
        opts.scale_out_waiting = float(raw) if not isinstance(raw, bool) else -1.0
    except ValueError:
        opts.scale_out_waiting = -1.0
    if not 0 < opts.scale_out_waiting <= 10000:
        raise UsageError(f"scale_out_waiting {raw!r} is not a positive number",
                         hint="requests waiting per replica that start one more, e.g. scale_out_waiting = 2")
    opts.scale_out_s = parse_duration(pick(None, "SAGE_LLM_GATEWAY_SCALE_OUT_AFTER", "scale_out_after", 3.0),
                                      "scale_out_after")
    opts.place_s = parse_duration(pick(None, "SAGE_LLM_GATEWAY_PLACE_TIMEOUT", "place_timeout", 5.0), "place_timeout")
    if opts.place_s <= 0:
        raise UsageError("place_timeout must be more than 0", hint='e.g. place_timeout = "10s"')
    opts.cluster = pick(cluster, "SAGE_LLM_GATEWAY_CLUSTER", "cluster", None) or None
    opts.cluster_key_env = str(pick(cluster_key_env, "SAGE_LLM_GATEWAY_CLUSTER_KEY_ENV", "cluster_key_env",
                                    CLUSTER_KEY_ENV))
    if opts.cluster is not None:
        check_cluster(opts)
    elif any(p.node for p in opts.profiles.values()):
        model = next(m for m, p in opts.profiles.items() if p.node)
        raise UsageError(f"gateway.models.{model!r}.node needs a cluster", hint="pass --cluster HOST:PORT (or "
                         "cluster = \"HOST:PORT\" in [gateway]), or remove the node key")
    return opts


def check_cluster(opts: GatewayOptions) -> None:
    """--cluster: a Ray head's HOST:PORT that answers, Ray installed, and the engines' key variable set here (the
    same variable must be set on every node, in the environment of `ray start`). UsageError otherwise."""
    import importlib.util
    import socket

    from sage_llm.engine.cluster import INSTALL_HINT, check_address

    host, port = check_address(str(opts.cluster))
    if not VAR_RE.match(opts.cluster_key_env):
        raise UsageError(f"--cluster-key-env {opts.cluster_key_env!r} is not a variable name",
                         hint=f"give the NAME of an environment variable, e.g. {CLUSTER_KEY_ENV}")
    if not os.environ.get(opts.cluster_key_env):
        raise UsageError(f"--cluster needs the engines' key in ${opts.cluster_key_env}, which is not set or empty",
                         hint=f"export {opts.cluster_key_env}=<a long random secret> here and in the environment "
                              "of `ray start` on every node (the key never travels through Ray)")
    if importlib.util.find_spec("ray") is None:
        raise UsageError("--cluster needs Ray, which is not installed", hint=INSTALL_HINT)
    try:
        with socket.create_connection((host, port), timeout=5.0):
            pass
    except OSError as exc:
        raise UsageError(f"the Ray cluster at {opts.cluster} is unreachable ({exc.strerror or exc})",
                         hint="check the address and that `ray start --head` runs there") from None
