"""`sage llm start`: launch `vllm serve` detached and wait until it serves the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

if TYPE_CHECKING:
    from collections.abc import Callable

EPILOG = (
    "Examples: sage llm start Qwen/Qwen2.5-1.5B-Instruct | "
    "sage llm start ./my-model --name mine --port 8010 --max-model-len 4096 | "
    "sage llm start Qwen/Qwen2.5-7B-Instruct-AWQ -q awq -- --enable-prefix-caching | "
    "sage llm start MODEL --no-wait && sage llm status MODEL-NAME"
)


def start(
    model: Annotated[str | None, typer.Argument(
        help="Hugging Face repo id or local path. Default: $SAGE_LOCAL_ENGINE_DEFAULT_MODEL or "
             "Qwen/Qwen2.5-7B-Instruct.", show_default=False, autocompletion=_complete.cached_models)] = None,
    vllm_args: Annotated[list[str] | None, typer.Argument(
        help="Extra vLLM arguments after `--`, passed through verbatim.", show_default=False)] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Engine name (default: from the model).")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help="Port (default: $SAGE_LOCAL_ENGINE_PORT or 8001;"
                                             " without --port the next free one is taken).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to bind (default: $SAGE_LOCAL_ENGINE_HOST or "
                                             "127.0.0.1). Anything but loopback needs an API key.")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        "--gpu-memory-utilization", "-u", help="Fraction of GPU memory for the engine, in (0, 1]. "
        "Default: $SAGE_LOCAL_ENGINE_GPU_UTIL or 0.9.")] = None,
    quantization: Annotated[str | None, typer.Option("--quantization", "-q", help="awq, gptq, fp8, ...")] = None,
    max_model_len: Annotated[str | None, typer.Option("--max-model-len", help="Context length, e.g. 4096 or 32k.")]
    = None,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="Model name the API serves.")]
    = None,
    tensor_parallel_size: Annotated[int | None, typer.Option("--tensor-parallel-size", "-tp")] = None,
    pipeline_parallel_size: Annotated[int | None, typer.Option("--pipeline-parallel-size", "-pp")] = None,
    data_parallel_size: Annotated[int | None, typer.Option("--data-parallel-size", "-dp")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", envvar="RAY_ADDRESS", help="Run the engine's ranks on this existing Ray cluster (HOST:PORT "
        "of its head): vLLM gets --distributed-executor-backend ray and RAY_ADDRESS.", show_default=False)] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="auto, half, float16, bfloat16, float, float32.")]
    = None,
    enforce_eager: Annotated[bool, typer.Option("--enforce-eager", help="No torch.compile/CUDA graphs: faster "
                                                "start, slower serving.")] = False,
    download_dir: Annotated[str | None, typer.Option("--download-dir", help="Where to download weights.")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", help="NAME of an environment variable holding the API key clients must send. The key "
        "reaches vLLM as VLLM_API_KEY, never on a command line.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the engine serves the model.")] = True,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to wait before giving up (default: "
                                                  "$SAGE_LLM_STARTUP_TIMEOUT or 900).")] = None,
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="GPUs to use: indices (0,1) or UUIDs; sets CUDA_VISIBLE_DEVICES. Default: the GPUs with the "
        "most free memory, as many as tensor x pipeline parallel size.", show_default=False)] = None,
    skip_checks: Annotated[bool, typer.Option(
        "--skip-checks", help="Start even if the GPUs lack free memory for --gpu-memory-utilization.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Start a vLLM engine in the background (its own process group), recorded in the state directory.

    Ctrl-C while waiting stops the waiting, not the engine: it goes on loading in the background.
    """
    try:
        result = launch(locals())
    except KeyboardInterrupt:
        out.info("stopped waiting; the engine goes on starting in the background: `sage llm status` shows it, "
                 "`sage llm stop NAME` stops it")
        raise typer.Exit(130) from None
    rec = result.record
    if json_:
        out.print_json({"name": rec.name, "state": "ready" if wait else "starting", "already_running":
                        result.already_running, "model": rec.model, "served_model_name": rec.served_model_name,
                        "host": rec.host, "port": rec.port, "base_url": rec.base_url, "pid": rec.pid,
                        "log_file": rec.log_file, "ready_after_s": result.ready_after_s, "gpus": rec.gpus})
        return
    if result.already_running:
        out.result(f"engine {rec.name!r} already serves {rec.served_model_name} at {rec.base_url} (pid {rec.pid})")
        return
    if wait:
        took = f" in {result.ready_after_s:.1f} s" if result.ready_after_s is not None else ""
        out.result(f"engine {rec.name!r} ready{took}: {rec.served_model_name} at {rec.base_url} (pid {rec.pid})")
        out.hint(f"chat: sage llm chat {rec.name} | logs: sage llm logs {rec.name} -f | stop: sage llm stop {rec.name}")
    else:
        out.result(f"engine {rec.name!r} starting: {rec.served_model_name} on {rec.base_url} (pid {rec.pid})")
        out.hint(f"check with `sage llm status {rec.name}` (exit 0 once ready); log: {rec.log_file}")


def launch(p: dict[str, Any], foreground: bool = False, checkpoint: Callable[[], None] | None = None) -> Any:
    """Resolve the options `start` and `run` share (flag > env > config), spawn the engine through manager.start
    with the load display, and print the notes that follow a launch. Returns manager's StartResult.

    `checkpoint` is called with every progress update while the engine loads (`run`: raises on a received signal)."""
    from sage_llm.config import DEFAULT_MODEL
    from sage_llm.engine import manager
    from sage_llm.engine.vllm import LaunchSpec

    model, vllm_args, name, port, host = p["model"], p["vllm_args"], p["name"], p["port"], p["host"]
    gpu_memory_utilization, timeout, wait = p["gpu_memory_utilization"], p["timeout"], p["wait"]
    extra = list(vllm_args or [])
    if model is not None and model.startswith("-"):
        extra.insert(0, model)
        model = None
    from sage_llm import settings

    model = settings.get("default_model", model)  # flag > env > .env > config file > default
    port_explicit = port is not None
    port = settings.get("local_engine_port", port)
    gpu_memory_utilization = settings.get("gpu_util", gpu_memory_utilization)
    host = settings.get("host", host)
    timeout = settings.get("start_timeout", timeout)
    spec = LaunchSpec(
        model=model or DEFAULT_MODEL, host=host, port=port, gpu_memory_utilization=gpu_memory_utilization,
        served_model_name=p["served_model_name"], quantization=p["quantization"], max_model_len=p["max_model_len"],
        tensor_parallel_size=p["tensor_parallel_size"], pipeline_parallel_size=p["pipeline_parallel_size"],
        dtype=p["dtype"], data_parallel_size=p["data_parallel_size"], ray_address=p["ray_address"] or None,
        enforce_eager=p["enforce_eager"], download_dir=p["download_dir"], trust_remote_code=p["trust_remote_code"],
        api_key_env=p["api_key_env"], extra_args=extra,
    )
    from sage_llm.cli.commands.models import announce_start

    note = announce_start(spec.model, spec.download_dir)  # offline + not cached: exit 2, before anything runs
    from sage_llm.cli._progress import LoadDisplay

    progress = LoadDisplay(enabled=wait)
    update = note.wrap(progress.update)
    on_progress = update if checkpoint is None else (lambda ev: (checkpoint(), update(ev)))
    try:
        result = manager.start(spec, name=name, port_explicit=port_explicit, wait=wait, timeout=timeout,
                               on_progress=on_progress, gpus=p["gpus"], skip_checks=p["skip_checks"],
                               foreground=foreground)
    finally:
        progress.close()
    note.flush()  # "cached" / "will download N GiB", if no progress update printed it
    for w in result.warnings:
        out.warning(w)
    if result.port_note:
        out.info(result.port_note)
    rec = result.record
    if rec.gpus and not result.already_running:
        how = {"auto": " (most free memory)", "environment": " (from CUDA_VISIBLE_DEVICES)"}
        out.info(f"GPU: {','.join(str(g['index']) for g in rec.gpus)}{how.get(rec.gpus[0].get('chosen_by'), '')}")
    return result
