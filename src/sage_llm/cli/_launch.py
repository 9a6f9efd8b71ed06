"""The launch options of `start`, `run`, `restart` and `switch`: the library declares them once
(`engine.vllm.LAUNCH_OPTIONS`: names and flags); this module adds what a command line needs (type, short alias, help).

`@launch_options("start")` or `@launch_options("override")` adds every option to a command's signature (so Typer
shows them) and hands the command one typed object instead: `launch=api.LaunchRequest(...)` for start/run,
`launch=api.LaunchOverrides(...)` for restart/switch (None = keep the recorded value). Defaults that come from
settings are resolved by `sage_llm.api`, never here.

Why a decorator that rewrites the signature rather than the options written out: Typer reads a command's options from
its signature, and the four commands share 15 of them; written out they would be declared four times (they were, and
drifted). Typer has no mechanism for options shared by some commands of a group (a group callback's options go before
the command name), so the decorator builds the signature with `inspect.Parameter`s; the command's own annotations are
resolved by `inspect.signature(eval_str=True)` in the command's module.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import typer

from sage_llm.cli import _complete
from sage_llm.engine.vllm import LAUNCH_OPTIONS


@dataclass(frozen=True)
class _Opt:
    name: str  # the field of api.LaunchOptions / LaunchRequest
    type: Any
    decls: tuple[str, ...]
    help: str
    start: str | None = None  # the default as `start` describes it (None: nothing to add)
    toggle: str | None = None  # "--x/--no-x" for booleans


def _launch_opt(name: str, type_: Any, short: tuple[str, ...], help_: str, start: str | None = None) -> _Opt:
    """A launch option of the library's table (its flag, and its switch as --x/--no-x), with what the CLI adds."""
    lib = _LIB[name]
    toggle = f"{lib.flag}/--no-{lib.flag[2:]}" if lib.switch else None
    return _Opt(name, type_, (lib.flag, *short), help_, start, toggle)


_LIB = {o.name: o for o in LAUNCH_OPTIONS}
_TABLE: tuple[_Opt, ...] = (  # in the order --help lists them
    _launch_opt("port", int, ("-p",), "Port.", "$SAGE_LOCAL_ENGINE_PORT or 8001; without --port the next free one "
                "is taken"),
    _launch_opt("host", str, (), "Address to bind; anything but loopback needs --api-key-env.",
                "$SAGE_LOCAL_ENGINE_HOST or 127.0.0.1"),
    _launch_opt("gpu_memory_utilization", float, ("-u",), "Fraction of GPU memory for the "
                "engine, in (0, 1].", "$SAGE_LOCAL_ENGINE_GPU_UTIL or 0.9"),
    _launch_opt("quantization", str, ("-q",), "awq, gptq, fp8, ..."),
    _launch_opt("max_model_len", str, (), "Context length, e.g. 4096 or 32k; unset: the longest the KV "
                "cache holds (auto)."),
    _launch_opt("served_model_name", str, (), "Model name the API serves."),
    _launch_opt("tensor_parallel_size", int, ("-tp",), "GPUs per model replica (tensor parallel)."),
    _launch_opt("pipeline_parallel_size", int, ("-pp",), "Pipeline stages."),
    _launch_opt("data_parallel_size", int, ("-dp",), "Data-parallel replicas."),
    _launch_opt("ray_address", str, (), "Run the engine's ranks on this existing Ray cluster (HOST:PORT of "
                "its head): vLLM gets --distributed-executor-backend ray and RAY_ADDRESS. '' drops it on restart.",
                "$RAY_ADDRESS"),
    _launch_opt("dtype", str, (), "auto, half, float16, bfloat16, float, float32."),
    _launch_opt("enforce_eager", bool, (), "No torch.compile/CUDA graphs: faster start, slower serving."),
    _launch_opt("download_dir", str, (), "Where to download weights."),
    _launch_opt("trust_remote_code", bool, (), "Run the model repository's own Python code."),
    _launch_opt("api_key_env", str, (), "NAME of an environment variable holding the API key clients "
                "must send. The key reaches vLLM as VLLM_API_KEY, never on a command line."),
)
LAUNCH_OPTION_NAMES = tuple(o.name for o in _TABLE)  # every one of the library's (tests/unit/test_launch_options.py)

_START_ONLY: tuple[_Opt, ...] = (
    _Opt("name", str, ("--name", "-n"), "Engine name (default: from the model)."),
    _Opt("timeout", float, ("--timeout",), "Seconds to wait until the engine serves.",
         "$SAGE_LLM_STARTUP_TIMEOUT or 900"),
    _Opt("gpus", str, ("--gpus",), "GPUs to use: indices (0,1) or UUIDs; sets CUDA_VISIBLE_DEVICES.",
         "the GPUs with the most free memory, as many as tensor x pipeline parallel size"),
    _Opt("skip_checks", bool, ("--skip-checks",), "Start even if the GPUs lack free memory for "
         "--gpu-memory-utilization."),
    _Opt("cluster", str, ("--cluster",), "Place the whole engine on a node of this Ray cluster (HOST:PORT of its "
         "head; needs sage-llm[ray]); Ray picks a node with tensor x pipeline parallel size GPUs free.",
         "$SAGE_LLM_CLUSTER, else this machine"),
    _Opt("node", str, ("--node",), "With --cluster: the node (id, address, hostname or a custom resource only it "
         "has)."),
)
_OVERRIDE_ONLY: tuple[_Opt, ...] = (
    _Opt("timeout", float, ("--timeout",), "Seconds to wait until the engine serves (default: "
         "$SAGE_LLM_STARTUP_TIMEOUT or 900)."),
    _Opt("gpus", str, ("--gpus",), "GPUs (indices or UUIDs). Default: those pinned before, else the ones with the "
         "most free memory."),
)

ExtraArg = Annotated[list[str] | None, typer.Argument(
    help="Extra vLLM arguments after `--`, passed through verbatim.", show_default=False)]
ModelArg = Annotated[str | None, typer.Argument(
    help="Hugging Face repo id or local path. Default: $SAGE_LOCAL_ENGINE_DEFAULT_MODEL or Qwen/Qwen2.5-7B-Instruct.",
    show_default=False, autocompletion=_complete.cached_models)]


def _param(opt: _Opt, mode: str) -> inspect.Parameter:
    help_ = opt.help
    if mode == "start" and opt.start:
        help_ = f"{help_} Default: {opt.start}."
    elif mode == "override" and opt.name in LAUNCH_OPTION_NAMES:
        help_ = f"{help_} Default: the recorded value."
    if opt.type is bool:
        if mode == "start" and opt.name in ("enforce_eager", "trust_remote_code", "skip_checks"):
            annotation: Any = Annotated[bool, typer.Option(*opt.decls, help=help_)]
            default: Any = False
        else:
            annotation = Annotated[bool | None, typer.Option(opt.toggle or opt.decls[0], help=help_,
                                                             show_default=False)]
            default = None
    else:
        envvar = "RAY_ADDRESS" if (opt.name == "ray_address" and mode == "start") else None
        annotation = Annotated[opt.type | None, typer.Option(*opt.decls, help=help_, envvar=envvar,
                                                             show_default=False)]
        default = None
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def launch_options(mode: Literal["start", "override"]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the launch options to a command; it receives them as one `launch` keyword argument.

    "start": `launch` is an api.LaunchRequest (the command's own `model` and `vllm_args` go into it too).
    "override": `launch` is an api.LaunchOverrides for restart/switch; `--timeout` and `--gpus` reach the command as
    its own `timeout` and `gpus` parameters (declared there without Typer metadata: the table's declaration wins)."""
    own = _START_ONLY if mode == "start" else _OVERRIDE_ONLY
    added = [_param(o, mode) for o in (*own, *_TABLE)]
    added_names = {p.name for p in added}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)  # string annotations resolved in the command's own module
        mine = [p for p in sig.parameters.values() if p.name != "launch" and p.name not in added_names]
        # Typer's order: the command's own arguments and options first, then the launch options, --json last
        head = [p for p in mine if p.name != "json_"]
        tail = [p for p in mine if p.name == "json_"]
        params = [*head, *added, *tail]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            from sage_llm import api

            values = {k: kwargs.pop(k) for k in list(kwargs) if k in added_names}
            extra = kwargs.get("vllm_args")
            if mode == "start":
                launch: Any = api.LaunchRequest(model=kwargs.get("model"), extra_args=list(extra or []), **values)
            else:
                launch = api.LaunchOverrides(extra_args=list(extra) if extra else None,
                                             **{k: v for k, v in values.items() if k in LAUNCH_OPTION_NAMES})
                kwargs.update({k: v for k, v in values.items() if k not in LAUNCH_OPTION_NAMES})
            return fn(launch=launch, **kwargs)

        command.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
