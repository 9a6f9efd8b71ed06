"""`sage llm switch NAME MODEL [--rolling]`: serve another model under the same name, every other setting kept."""

from __future__ import annotations

from typing import Annotated

import typer

from sage_llm.cli import _complete
from sage_llm.cli._options import JsonOpt
from sage_llm.cli.commands.restart import (
    DownloadOpt,
    DpOpt,
    DtypeOpt,
    EagerOpt,
    ExtraArg,
    GpusOpt,
    HostOpt,
    KeyEnvOpt,
    MaxLenOpt,
    PortOpt,
    PpOpt,
    QuantOpt,
    RayOpt,
    ServedOpt,
    TimeoutOpt,
    TpOpt,
    TrustOpt,
    UtilOpt,
    overrides_from,
    print_result,
)

EPILOG = ("Examples: sage llm switch qwen Qwen/Qwen2.5-3B-Instruct | "
          "sage llm switch qwen Qwen/Qwen2.5-3B-Instruct --rolling && sage llm status qwen --json | "
          "sage llm switch qwen ./my-model --max-model-len 4096")


def switch(
    name: Annotated[str, typer.Argument(help="Engine name.", show_default=False,
                                        autocompletion=_complete.engine_names)],
    model: Annotated[str, typer.Argument(help="Hugging Face repo id or local path to serve.", show_default=False,
                                         autocompletion=_complete.cached_models)],
    vllm_args: ExtraArg = None,
    rolling: Annotated[bool, typer.Option("--rolling", help="Start the new model on a free port, wait until it "
                                          "serves, then stop the old one; if the new one fails, the old one keeps "
                                          "serving.")] = False,
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
    """Switch an engine to another model; every other recorded setting is kept unless given here.

    Without --rolling the engine restarts in place (same port). With --rolling the new engine takes over the name,
    and `status --json` shows its new port.
    """
    from sage_llm.cli._progress import LoadDisplay
    from sage_llm.engine import switch as core

    params = locals()
    given = overrides_from({k: v for k, v in params.items() if k != "model"})  # the model is switch's own argument
    progress = LoadDisplay(enabled=True)
    try:
        result = core.switch(name, model, rolling=rolling, overrides=given, gpus=gpus, timeout=timeout,
                             on_progress=progress.update)
    finally:
        progress.close()
    print_result(result, json_, "switched" + (" (rolling)" if result.rolling else ""))
