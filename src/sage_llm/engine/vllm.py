"""Pure: launch options -> the `vllm serve` command line and environment. No processes here."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from sage_llm.core.config import DEFAULT_CPU_KVCACHE_GIB, EnvVars
from sage_llm.core.errors import UsageError
from sage_llm.core.records import Record, field

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the `status` path skips it (core/records.py)
if TYPE_CHECKING:
    from typing import Any

# vLLM 0.33 `--quantization` choices (vllm/model_executor/layers/quantization/__init__.py). argparse does not check
# them; vLLM fails minutes later with "Unknown quantization method", so we check before spawning.
QUANTIZATION_METHODS = (
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8",
    "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming", "compressed-tensors",
    "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8", "online",
    "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only", "nvfp4_per_token", "mxfp8",
    "bitsandbytes", "gguf",
)
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
MAX_LEN_RE = re.compile(r"^(-1|auto|\d+(\.\d+)?[kKmM]?)$")
RAY_ADDRESS_RE = re.compile(r"^(auto|(ray://)?(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9._-]+):\d{1,5})$")
# options that carry secrets and must never reach argv
SECRET_FLAGS = ("--api-key", "--hf-token")


class LaunchSpec(Record):
    model: str
    host: str
    port: int
    gpu_memory_utilization: float
    served_model_name: str | None = None
    quantization: str | None = None
    max_model_len: str | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    data_parallel_size: int | None = None
    dtype: str | None = None
    enforce_eager: bool = False
    download_dir: str | None = None
    trust_remote_code: bool = False
    api_key_env: str | None = None  # name of the variable holding the key
    ray_address: str | None = None  # an existing Ray cluster: RAY_ADDRESS + --distributed-executor-backend ray
    extra_args: list[str] = field(default_factory=list)  # after `--`, verbatim

    def settings(self) -> dict[str, Any]:
        """Everything needed to start it again (no secret: only the key's variable name)."""
        return {k: v for k, v in self.__dict__.items()}


class LaunchOption(Record, frozen=True):
    """A launch option: its field in LaunchSpec, api.LaunchOptions and an engine record's settings; its flag on `start`
    (cli/_launch.py) and, when `to_vllm`, on `vllm serve` (build_argv)."""

    name: str
    flag: str
    switch: bool = False  # a flag without a value: --enforce-eager
    to_vllm: bool = True  # passed to `vllm serve` under this flag


# The launch options, declared once, in the order `vllm serve` gets them. The typed classes that carry them
# (LaunchSpec above, api.LaunchOptions) declare the same names; tests/unit/test_launch_options.py holds them together.
LAUNCH_OPTIONS: tuple[LaunchOption, ...] = (
    LaunchOption("host", "--host"),
    LaunchOption("port", "--port"),
    LaunchOption("gpu_memory_utilization", "--gpu-memory-utilization"),
    LaunchOption("served_model_name", "--served-model-name"),
    LaunchOption("quantization", "--quantization"),
    LaunchOption("max_model_len", "--max-model-len"),
    LaunchOption("tensor_parallel_size", "--tensor-parallel-size"),
    LaunchOption("pipeline_parallel_size", "--pipeline-parallel-size"),
    LaunchOption("data_parallel_size", "--data-parallel-size"),
    LaunchOption("dtype", "--dtype"),
    LaunchOption("enforce_eager", "--enforce-eager", switch=True),
    LaunchOption("download_dir", "--download-dir"),
    LaunchOption("trust_remote_code", "--trust-remote-code", switch=True),
    LaunchOption("api_key_env", "--api-key-env", to_vllm=False),  # the key reaches vLLM as VLLM_API_KEY (build_env)
    LaunchOption("ray_address", "--ray-address", to_vllm=False),  # RAY_ADDRESS, and the Ray backend (build_argv)
)
LAUNCH_OPTION_NAMES = tuple(o.name for o in LAUNCH_OPTIONS)


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or (os.sep in model and Path(model).expanduser().exists())


MODEL_HINT = "give a Hugging Face id like Qwen/Qwen2.5-1.5B-Instruct or a path"


def check_model_name(model: str | None, what: str = "MODEL", hint: str = MODEL_HINT) -> None:
    """A model name that was given must not be empty or blank (UsageError, exit 2): an empty argument is a mistake
    (an unset shell variable, say), never a request for the default model."""
    if model is not None and not model.strip():
        raise UsageError(f"{what} is empty" + (f" ({model!r})" if model else ""), hint=hint)


def validate(spec: LaunchSpec, environ: Mapping[str, str] | None = None) -> None:
    """Raise UsageError (exit 2) for anything vLLM would reject later. `environ`: where --api-key-env is looked up
    (default: this process's environment)."""
    check_model_name(spec.model or "")
    if looks_like_path(spec.model):
        p = Path(spec.model).expanduser()
        if not p.exists():
            raise UsageError(f"model path {spec.model} does not exist", hint="check the path, or give a hub id")
        if p.is_dir() and not (p / "config.json").exists():
            raise UsageError(f"model directory {spec.model} has no config.json",
                             hint="point at a Hugging Face checkpoint directory")
    elif spec.model.count("/") > 1 or spec.model.startswith("/") or " " in spec.model:
        raise UsageError(f"model {spec.model!r} is neither an existing path nor a hub id (ORG/NAME)",
                         hint="for example Qwen/Qwen2.5-1.5B-Instruct")
    if not 1 <= spec.port <= 65535:
        raise UsageError(f"port {spec.port} is out of range", hint="use a port between 1 and 65535, e.g. --port 8001")
    if not 0.0 < spec.gpu_memory_utilization <= 1.0:
        raise UsageError(
            f"--gpu-memory-utilization {spec.gpu_memory_utilization} is out of range",
            hint="give a fraction in (0, 1], e.g. 0.9",
        )
    if spec.quantization is not None and spec.quantization not in QUANTIZATION_METHODS:
        raise UsageError(
            f"unknown quantization method {spec.quantization!r}",
            hint="use one of: " + ", ".join(QUANTIZATION_METHODS[:14]) + ", ... (or leave it out: vLLM reads it"
            " from the model)",
        )
    if spec.max_model_len is not None and not MAX_LEN_RE.match(str(spec.max_model_len)):
        raise UsageError(f"--max-model-len {spec.max_model_len!r} is not a length",
                         hint="give tokens like 4096, 32k, or auto")
    if spec.dtype is not None and spec.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {spec.dtype!r}", hint="use one of: " + ", ".join(DTYPES))
    for label, value in (("--tensor-parallel-size", spec.tensor_parallel_size),
                         ("--pipeline-parallel-size", spec.pipeline_parallel_size),
                         ("--data-parallel-size", spec.data_parallel_size)):
        if value is not None and value < 1:
            raise UsageError(f"{label} {value} must be 1 or more", hint=f"e.g. {label} 2")
    if spec.ray_address is not None and not RAY_ADDRESS_RE.match(spec.ray_address):
        raise UsageError(f"--ray-address {spec.ray_address!r} is not a Ray cluster address",
                         hint="give HOST:PORT of the head's GCS (e.g. 10.0.0.5:6379), ray://HOST:PORT, or auto")
    if spec.served_model_name is not None and not spec.served_model_name.strip():
        raise UsageError("--served-model-name is empty", hint="give a name or leave the option out")
    if spec.api_key_env is not None:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", spec.api_key_env):
            raise UsageError(f"--api-key-env {spec.api_key_env!r} is not a variable name",
                             hint="give the NAME of an environment variable holding the key, e.g. MY_VLLM_KEY")
        if not (os.environ if environ is None else environ).get(spec.api_key_env):
            raise UsageError(f"--api-key-env names {spec.api_key_env}, which is not set or empty",
                             hint=f"export {spec.api_key_env}=... first")
    for arg in spec.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            raise UsageError(
                f"{flag} after `--` would put a secret on the command line",
                hint="use --api-key-env VAR for the API key and HF_TOKEN in the environment for the hub token",
            )


# The dtype a CPU engine computes in when the user chose none. vLLM's `--dtype auto` takes bfloat16 on every x86 CPU
# (even for a float32 checkpoint: vllm/config/model.py _resolve_auto_dtype), and its bf16 kernels differ per CPU
# (AMX tiles, AVX512-BF16, or AVX2 emulation: vllm/platforms/cpu.py import_kernels, cpu_attn._get_attn_isa). On
# Intel CPUs with AMX, SmolLM2 in bf16 answered nonsense where float32 answered right (issue 12, docs/benchmarks.md),
# so CPU engines run float32 by default: right answers first; `--dtype bfloat16` trades them for half the memory.
CPU_DEFAULT_DTYPE = "float32"
# float32 weights must leave room for the KV cache and vLLM's own processes (about 3 GB): above this share of the
# available memory the CPU default falls back to vLLM's auto (bfloat16) and says so.
CPU_FP32_MAX_MEMORY_SHARE = 0.5
DTYPE_SOURCES = ("user", "cpu-default", "auto")


class DtypeChoice(Record):
    """The --dtype a launch passes (None: vLLM's auto), where it came from, and why (one clause, for `start`)."""

    value: str | None
    source: str  # one of DTYPE_SOURCES
    reason: str

    def label(self) -> str:
        return self.value or "auto"

    def line(self, resolved: str | None = None) -> str:
        """`dtype: float32 (CPU default; --dtype to change)`; `resolved`: what vLLM logged it runs in."""
        shown = self.value or (f"{resolved} (vLLM's auto)" if resolved else "auto")
        return f"dtype: {shown} ({self.reason})"


def concrete_dtype(value: str | None) -> str | None:
    """The torch dtype name a --dtype value means ("half" -> "float16"); None for auto, unknown or None."""
    return {"float": "float32", "float32": "float32", "half": "float16", "float16": "float16",
            "bfloat16": "bfloat16"}.get(value or "")


def arg_value(args: list[str], *names: str) -> str | None:
    """The value of an option given after `--` under any of `names` (`NAME X` or `NAME=X`; the last one wins, as in
    argparse), else None."""
    found = None
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            found = args[i + 1]
        elif "=" in arg and arg.split("=", 1)[0] in names:
            found = arg.split("=", 1)[1]
    return found


def dtype_from_args(args: list[str]) -> str | None:
    """The --dtype given after `--`, else None."""
    return arg_value(args, "--dtype")


def _size(value: int | None, args: list[str], *names: str) -> int:
    """A parallel size: the option's value, else the one given after `--` (vLLM reads those too), else 1."""
    if value:
        return value
    raw = arg_value(args, *names)
    return int(raw) if raw is not None and raw.isdigit() and int(raw) > 0 else 1


def model_parallel(spec: LaunchSpec) -> int:
    """GPUs one copy of the model spans: tensor x pipeline parallel size (as options or after `--`)."""
    return (_size(spec.tensor_parallel_size, spec.extra_args, "--tensor-parallel-size", "-tp")
            * _size(spec.pipeline_parallel_size, spec.extra_args, "--pipeline-parallel-size", "-pp"))


def choose_dtype(spec: LaunchSpec, cpu_engine: bool, quantized: bool = False, fp32_weight_bytes: int | None = None,
                 memory_available: int | None = None) -> DtypeChoice:
    """The engine's compute dtype. The user's --dtype (option or after `--`) always wins. A CPU engine otherwise gets
    float32 (CPU_DEFAULT_DTYPE), except for a quantized model (its kernels want 16-bit activations) and for weights
    that in float32 would take more than CPU_FP32_MAX_MEMORY_SHARE of the available memory; those keep vLLM's auto.
    GPU engines keep vLLM's auto (the checkpoint's dtype)."""
    explicit = dtype_from_args(spec.extra_args) or spec.dtype
    if explicit:
        return DtypeChoice(explicit, "user", "as asked")
    if not cpu_engine:
        return DtypeChoice(None, "auto", "the checkpoint's; --dtype to change")
    if quantized or spec.quantization:
        return DtypeChoice(None, "auto", "quantized model on CPU; --dtype to change")
    if fp32_weight_bytes and memory_available and fp32_weight_bytes > CPU_FP32_MAX_MEMORY_SHARE * memory_available:
        gib = 1024 ** 3
        return DtypeChoice(None, "auto", f"not the CPU default float32: its weights ({fp32_weight_bytes / gib:.1f} GiB)"
                           f" would not fit beside {memory_available / gib:.1f} GiB available; bf16 output can be "
                           "wrong on some CPUs (docs/troubleshooting.md), --dtype float32 forces it")
    return DtypeChoice(CPU_DEFAULT_DTYPE, "cpu-default", "CPU default; --dtype to change")


# `--max-model-len auto` (vLLM PR #29431; 0.32 here): fit the context to the KV cache memory instead of failing
AUTO_LEN_SINCE = (0, 13)
AUTO_FIT_RE = re.compile(r"Auto-fit max_model_len: reduced from (\d+) to (\d+)")


def supports_auto_len(version: str | None) -> bool:
    """Whether a vLLM of this version (`0.32.0+cpu`, ...) takes `--max-model-len auto`; False when unknown."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return m is not None and (int(m.group(1)), int(m.group(2))) >= AUTO_LEN_SINCE


def fitted_len(lines: list[str]) -> tuple[int, int] | None:
    """(the model's context length, the one vLLM fitted) when `--max-model-len auto` had to shorten it, from the log."""
    for line in reversed(lines):
        m = AUTO_FIT_RE.search(line)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def build_argv(prefix: list[str], spec: LaunchSpec, dtype: DtypeChoice | None = None,
               auto_len: bool = False) -> list[str]:
    """`dtype`: the choice of choose_dtype(); its value is passed when the user gave no --dtype of their own.
    `auto_len`: the engine takes `--max-model-len auto`, passed when the user gave no --max-model-len."""
    argv = [*prefix, "serve", spec.model]
    for opt in LAUNCH_OPTIONS:
        if not opt.to_vllm:
            continue
        value = getattr(spec, opt.name)
        if opt.name == "dtype" and not value and dtype is not None and dtype.value and dtype.source != "user":
            value = dtype.value  # the CPU default, when the user gave no --dtype
        elif opt.name == "max_model_len" and value is None and auto_len and \
                not any(a.split("=", 1)[0] == "--max-model-len" for a in spec.extra_args):
            value = "auto"  # the engine fits the context to its KV cache
        if opt.switch:
            if value:
                argv.append(opt.flag)
        elif value is not None and value != "":
            argv += [opt.flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if spec.ray_address and not any(a.split("=", 1)[0] == "--distributed-executor-backend" for a in spec.extra_args):
        # vLLM has no address flag: it reads RAY_ADDRESS (set in build_env)
        argv += ["--distributed-executor-backend", "ray"]
    argv += list(spec.extra_args)
    return argv


def build_env(
    spec: LaunchSpec,
    engine_id: str,
    cpu_engine: bool,
    base: dict[str, str] | None = None,
    offline_ok: bool = False,
) -> tuple[dict[str, str], dict[str, str]]:
    """(full environment for the child, the variables we added, secrets redacted)."""
    env = dict(os.environ if base is None else base)
    added: dict[str, str] = {EnvVars.ENGINE_MARK: engine_id}
    env[EnvVars.ENGINE_MARK] = engine_id
    # a key the user exported for themselves must not silently turn on auth for an engine that did not ask for it
    env.pop(EnvVars.API_KEY_CHILD, None)
    if spec.api_key_env:
        env[EnvVars.API_KEY_CHILD] = env.get(spec.api_key_env, "")
        added[EnvVars.API_KEY_CHILD] = f"<from ${spec.api_key_env}>"
    if cpu_engine and not env.get(EnvVars.CPU_KVCACHE):
        env[EnvVars.CPU_KVCACHE] = DEFAULT_CPU_KVCACHE_GIB
        added[EnvVars.CPU_KVCACHE] = DEFAULT_CPU_KVCACHE_GIB
    if offline_ok and "HF_HUB_OFFLINE" not in env:
        # the model is complete in the local cache: do not let vLLM stall on an unreachable hub
        env["HF_HUB_OFFLINE"] = "1"
        added["HF_HUB_OFFLINE"] = "1"
    if cpu_engine and world_size(spec) > 1 and not any(env.get(v) for v in (CPU_BIND, "VLLM_CPU_SIM_MULTI_NUMA")):
        # vLLM's CPU build wants one NUMA node per rank and refuses to start otherwise; split the cores instead
        env[CPU_BIND] = added[CPU_BIND] = cpu_bind_for(world_size(spec))
    if spec.ray_address:
        env["RAY_ADDRESS"] = added["RAY_ADDRESS"] = spec.ray_address
        if ray_address_is_loopback(spec.ray_address) and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env:
            # without it Ray rewrites 127.0.0.1 to the machine's other address and vLLM hangs in ray.init
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = added["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env, added


CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def world_size(spec: LaunchSpec) -> int:
    """Processes one engine runs on this node: tensor x pipeline x data parallel ranks."""
    return model_parallel(spec) * _size(spec.data_parallel_size, spec.extra_args, "--data-parallel-size", "-dp")


def gpus_needed(spec: LaunchSpec) -> int:
    """GPUs the engine needs on this node (every rank holds one GPU); 0 when its ranks run on a Ray cluster."""
    return 0 if spec.ray_address else world_size(spec)


def cpu_bind_for(ranks: int, cores: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: disjoint core ranges ('0|1', '0-3|4-7'), else 'nobind'."""
    if cores is None:
        try:
            cores = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = list(range(os.cpu_count() or 1))
    if ranks < 2 or len(cores) < ranks:
        return "nobind"
    per = len(cores) // ranks
    groups = []
    for r in range(ranks):
        chunk = cores[r * per:(r + 1) * per]
        contiguous = chunk[-1] - chunk[0] == len(chunk) - 1
        groups.append((f"{chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else str(chunk[0])) if contiguous
                      else ",".join(map(str, chunk)))
    return "|".join(groups)


def ray_address_is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
