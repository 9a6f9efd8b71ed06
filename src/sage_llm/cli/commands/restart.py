"""`sage llm restart NAME [--model M] [start options]`: stop and start again, every recorded setting kept."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

EPILOG = ("Examples: sage llm restart qwen | sage llm restart qwen --max-model-len 8192 | "
          "sage llm restart qwen --model Qwen/Qwen2.5-3B-Instruct | sage llm restart qwen -- --enable-prefix-caching")

# Launch options that override the recorded ones. Every default is None: only what the user gives changes.
PortOpt = Annotated[int | None, typer.Option("--port", "-p", help="Port (default: the recorded one).")]
HostOpt = Annotated[str | None, typer.Option("--host", help="Address to bind.")]
UtilOpt = Annotated[float | None, typer.Option("--gpu-memory-utilization", "-u", help="Fraction of GPU memory.")]
QuantOpt = Annotated[str | None, typer.Option("--quantization", "-q", help="awq, gptq, fp8, ...")]
MaxLenOpt = Annotated[str | None, typer.Option("--max-model-len", help="Context length, e.g. 4096 or 32k.")]
ServedOpt = Annotated[str | None, typer.Option("--served-model-name", help="Model name the API serves.")]
TpOpt = Annotated[int | None, typer.Option("--tensor-parallel-size", "-tp")]
PpOpt = Annotated[int | None, typer.Option("--pipeline-parallel-size", "-pp")]
DpOpt = Annotated[int | None, typer.Option("--data-parallel-size", "-dp")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto, half, float16, bfloat16, float, float32.")]
EagerOpt = Annotated[bool | None, typer.Option("--enforce-eager/--no-enforce-eager", show_default=False)]
DownloadOpt = Annotated[str | None, typer.Option("--download-dir", help="Where to download weights.")]
TrustOpt = Annotated[bool | None, typer.Option("--trust-remote-code/--no-trust-remote-code", show_default=False)]
KeyEnvOpt = Annotated[str | None, typer.Option("--api-key-env", help="NAME of the variable holding the API key.")]
RayOpt = Annotated[str | None, typer.Option("--ray-address", help="Ray cluster (HOST:PORT); '' drops Ray.",
                                            show_default=False)]
GpusOpt = Annotated[str | None, typer.Option("--gpus", help="GPUs (indices or UUIDs). Default: those pinned before, "
                                             "else the ones with the most free memory.", show_default=False)]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the engine to serve.")]
ExtraArg = Annotated[list[str] | None, typer.Argument(
    help="Extra vLLM arguments after `--`: replace the recorded ones.", show_default=False)]


# the launch options restart and switch accept as overrides (CLI parameter names)
OVERRIDE_KEYS = ("model", "port", "host", "gpu_memory_utilization", "quantization", "max_model_len",
                 "served_model_name", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "dtype",
                 "enforce_eager", "download_dir", "trust_remote_code", "api_key_env", "ray_address", "vllm_args")


def overrides_from(values: dict[str, Any]) -> dict[str, Any]:
    """`overrides()` of the launch options found in a command's parameters (its `locals()`)."""
    return overrides(**{k: values[k] for k in OVERRIDE_KEYS if k in values})


def overrides(**given: Any) -> dict[str, Any]:
    """Launch-option overrides from CLI values: None means 'keep the recorded value'."""
    out_: dict[str, Any] = {k: v for k, v in given.items() if v is not None and k != "vllm_args"}
    if given.get("vllm_args"):
        out_["extra_args"] = list(given["vllm_args"])
    if out_.get("ray_address") == "":
        out_["ray_address"] = None
    return out_


def print_result(result: Any, json_: bool, verb: str) -> None:
    rec = result.record
    for w in result.warnings:
        out.warning(w)
    if result.port_note:
        out.info(result.port_note)
    stop = result.stop
    if stop is not None:
        for note in stop.notes:
            out.warning(note)
    if json_:
        out.print_json(result.to_json())
    else:
        for key, (before, after) in result.changed.items():
            out.info(f"  {key}: {before!r} -> {after!r}")
        took = f" in {result.ready_after_s:.1f} s" if result.ready_after_s is not None else ""
        out.result(f"engine {rec.name!r} {verb}{took}: {rec.served_model_name} at {rec.base_url} (pid {rec.pid})")
    if stop is not None and not stop.stopped:
        out.error(f"the previous engine did not stop: {stop.message}",
                  f"inspect with `sage llm status`; retry `sage llm stop {stop.name}`")
        raise typer.Exit(1)


def restart(
    name: Annotated[str, typer.Argument(help="Engine name.", show_default=False,
                                        autocompletion=_complete.engine_names)],
    vllm_args: ExtraArg = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Serve another model (default: the same).")]
    = None,
    port: PortOpt = None,
    host: HostOpt = None,
    gpu_memory_utilization: UtilOpt = None,
    quantization: QuantOpt = None,
    max_model_len: MaxLenOpt = None,
    served_model_name: ServedOpt = None,
    tensor_parallel_size: TpOpt = None,
    pipeline_parallel_size: PpOpt = None,
    data_parallel_size: DpOpt = None,
    dtype: DtypeOpt = None,
    enforce_eager: EagerOpt = None,
    download_dir: DownloadOpt = None,
    trust_remote_code: TrustOpt = None,
    api_key_env: KeyEnvOpt = None,
    ray_address: RayOpt = None,
    gpus: GpusOpt = None,
    timeout: TimeoutOpt = 900.0,
    json_: JsonOpt = False,
) -> None:
    """Stop an engine and start it again with every recorded setting, except the ones given here.

    Options are checked before the engine is stopped; the port stays the same unless --port is given.
    """
    from sage_llm.cli._progress import LoadDisplay
    from sage_llm.engine import switch

    given = overrides_from(locals())
    progress = LoadDisplay(enabled=True)
    try:
        result = switch.restart(name, given, gpus=gpus, timeout=timeout, on_progress=progress.update)
    finally:
        progress.close()
    print_result(result, json_, "restarted")
