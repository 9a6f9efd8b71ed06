"""The launch options of `start`, `run`, `restart` and `switch`, declared once.

`@launch_options("start")` or `@launch_options("override")` adds every option of the table below to a command's
signature (so Typer shows them) and hands the command one typed object instead: `launch=api.LaunchRequest(...)` for
start/run, `launch=api.LaunchOverrides(...)` for restart/switch (None = keep the recorded value). Defaults that come
from settings are resolved by `sage_llm.api`, never here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import typer

from sage_llm.cli import _complete


@dataclass(frozen=True)
class _Opt:
    name: str  # the field of api.LaunchOptions / LaunchRequest
    type: Any
    decls: tuple[str, ...]
    help: str
    start: str | None = None  # the default as `start` describes it (None: nothing to add)
    toggle: str | None = None  # "--x/--no-x" for booleans


_TABLE: tuple[_Opt, ...] = (
    _Opt("port", int, ("--port", "-p"), "Port.", "$SAGE_LOCAL_ENGINE_PORT or 8001; without --port the next free one "
         "is taken"),
    _Opt("host", str, ("--host",), "Address to bind; anything but loopback needs --api-key-env.",
         "$SAGE_LOCAL_ENGINE_HOST or 127.0.0.1"),
    _Opt("gpu_memory_utilization", float, ("--gpu-memory-utilization", "-u"), "Fraction of GPU memory for the "
         "engine, in (0, 1].", "$SAGE_LOCAL_ENGINE_GPU_UTIL or 0.9"),
    _Opt("quantization", str, ("--quantization", "-q"), "awq, gptq, fp8, ..."),
    _Opt("max_model_len", str, ("--max-model-len",), "Context length, e.g. 4096 or 32k; unset: the longest the KV "
         "cache holds (auto)."),
    _Opt("served_model_name", str, ("--served-model-name",), "Model name the API serves."),
    _Opt("tensor_parallel_size", int, ("--tensor-parallel-size", "-tp"), "GPUs per model replica (tensor parallel)."),
    _Opt("pipeline_parallel_size", int, ("--pipeline-parallel-size", "-pp"), "Pipeline stages."),
    _Opt("data_parallel_size", int, ("--data-parallel-size", "-dp"), "Data-parallel replicas."),
    _Opt("ray_address", str, ("--ray-address",), "Run the engine's ranks on this existing Ray cluster (HOST:PORT of "
         "its head): vLLM gets --distributed-executor-backend ray and RAY_ADDRESS. '' drops it on restart.",
         "$RAY_ADDRESS"),
    _Opt("dtype", str, ("--dtype",), "auto, half, float16, bfloat16, float, float32."),
    _Opt("enforce_eager", bool, ("--enforce-eager",), "No torch.compile/CUDA graphs: faster start, slower serving.",
         toggle="--enforce-eager/--no-enforce-eager"),
    _Opt("download_dir", str, ("--download-dir",), "Where to download weights."),
    _Opt("trust_remote_code", bool, ("--trust-remote-code",), "Run the model repository's own Python code.",
         toggle="--trust-remote-code/--no-trust-remote-code"),
    _Opt("api_key_env", str, ("--api-key-env",), "NAME of an environment variable holding the API key clients "
         "must send. The key reaches vLLM as VLLM_API_KEY, never on a command line."),
)
LAUNCH_OPTION_NAMES = tuple(o.name for o in _TABLE)

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
        sig = inspect.signature(fn)
        mine = [p.replace(annotation=eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str)
                          else p.annotation)
                for p in sig.parameters.values() if p.name != "launch" and p.name not in added_names]
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
