"""`sage-llm models [list] | pull | rm | import | recommend`: the models on disk and how to get more."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from sage_llm.cli import _complete
from sage_llm.cli import _output as out
from sage_llm.cli._options import JsonOpt, YesOpt

EPILOG = ("Examples: sage-llm models | sage-llm models --json | sage-llm models pull Qwen/Qwen2.5-1.5B-Instruct | "
          "sage-llm models rm Qwen/Qwen2.5-1.5B-Instruct -y | "
          "sage-llm models import ./model.Q4_K_M.gguf --as me/my-model | sage-llm models recommend")

models_app = typer.Typer(
    help="Models in the Hugging Face cache: list, pull, remove, import GGUF, recommend.",
    epilog=EPILOG, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
)

RepoArg = Annotated[str, typer.Argument(help="Hugging Face repo id, ORG/NAME.", show_default=False,
                                        autocompletion=_complete.cached_models)]


@models_app.callback(invoke_without_command=True)
def models_root(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List the models on disk (the same as `models list`)."""
    if ctx.invoked_subcommand is None:
        list_models(json_=json_)


@models_app.command("list", epilog="Examples: sage-llm models list | sage-llm models list --json")
def list_models(json_: JsonOpt = False) -> None:
    """Models in the hub cache ($HF_HOME/hub or $HF_HUB_CACHE) and in any --download-dir a running engine uses: size,
    revisions, last used, architecture, context length, quantization, completeness, and the engines serving each."""
    from sage_llm.engine.catalog import local_models
    from sage_llm.models import hf_cache

    models, warnings = local_models()
    for w in warnings:
        out.warning(w)
    if json_:
        out.print_json({"cache_dir": str(hf_cache.hub_cache_dir()), "models": [m.to_json() for m in models]})
        return
    if not models:
        out.info(f"no models in {hf_cache.hub_cache_dir()}")
        out.hint("download one: sage-llm models pull Qwen/Qwen2.5-1.5B-Instruct (or see `sage-llm models recommend`)")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("MODEL", "SIZE", "REVS", "LAST USED", "ARCHITECTURE", "CONTEXT", "QUANT", "STATE", "SERVED BY"):
        table.add_column(col, no_wrap=col != "SERVED BY")
    for m in models:
        if m.error:
            state = "corrupt"
        elif m.incomplete_files:
            state = f"incomplete ({out.human_bytes(m.incomplete_bytes)} partial)"
        elif not m.complete:
            state = "incomplete"
        else:
            state = "complete"
        served = ", ".join(f"{u['name']} :{u['port']}" for u in m.served_by) or "-"
        name = m.repo_id + (f"  [{m.cache_dir}]" if m.source != "hf-cache" else "")
        table.add_row(name, out.human_bytes(m.size_on_disk), str(len(m.revisions)), out.human_ago(m.last_accessed),
                      m.architecture or "?", str(m.context_length or "?"), m.quantization or "-", state, served)
    out.console().print(table)
    total = sum(m.size_on_disk for m in models)
    out.info(f"{len(models)} model(s), {out.human_bytes(total)} in {hf_cache.hub_cache_dir()}")


@models_app.command("pull", epilog="Examples: sage-llm models pull Qwen/Qwen2.5-1.5B-Instruct | "
                    "sage-llm models pull Qwen/Qwen2.5-7B-Instruct-AWQ --include '*.json' --include '*.safetensors' | "
                    "HF_TOKEN=hf_... sage-llm models pull meta-llama/Llama-3.2-1B-Instruct")
def pull(
    repo_id: RepoArg,
    revision: Annotated[str | None, typer.Option("--revision", "-r", help="Branch, tag or commit (default: main).")]
    = None,
    include: Annotated[list[str] | None, typer.Option("--include", "-i", help="Only files matching this glob "
                                                      "(repeatable).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Download a model into the hub cache, with a progress bar on stderr. Interrupted downloads resume. Honours
    HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE."""
    from sage_llm.engine.catalog import pull as do_pull

    bar = _Bar(f"pulling {repo_id}")
    try:
        result = do_pull(repo_id, revision=revision, include=include, on_bytes=bar.update)
    finally:
        bar.close()
    if json_:
        out.print_json({"repo_id": result.repo_id, "revision": result.revision, "snapshot_path": result.snapshot_path,
                        "size_on_disk": result.size_on_disk, "nb_files": result.nb_files,
                        "seconds": round(result.seconds, 2)})
        return
    out.result(f"{result.repo_id} ({result.revision}): {out.human_bytes(result.size_on_disk)} in "
               f"{result.nb_files} file(s) at {result.snapshot_path}")
    out.hint(f"serve it: sage-llm start {result.repo_id}")


@models_app.command("rm", epilog="Examples: sage-llm models rm Qwen/Qwen2.5-1.5B-Instruct | "
                    "sage-llm models rm Qwen/Qwen2.5-1.5B-Instruct -y --json")
def rm(repo_id: RepoArg, yes: YesOpt = False, json_: JsonOpt = False) -> None:
    """Delete a model from the cache (every revision and partial download). Refuses while an engine serves it."""
    from sage_llm.core.errors import UsageError
    from sage_llm.engine.catalog import plan_remove, remove

    plan = plan_remove(repo_id)
    where = ", ".join(sorted({m.repo_path for m in plan.entries}))
    if not yes:
        if json_ or not sys.stdin.isatty():
            raise UsageError(f"removing {repo_id} ({out.human_bytes(plan.freed_bytes)}) needs confirmation",
                             hint=f"add -y: sage-llm models rm {repo_id} -y")
        if not typer.confirm(f"Delete {repo_id} ({out.human_bytes(plan.freed_bytes)} in {where})?", err=True):
            out.info("nothing removed")
            raise typer.Exit(1)
    freed = remove(plan)
    if json_:
        out.print_json({"repo_id": repo_id, "removed": [m.repo_path for m in plan.entries], "freed_bytes": freed})
        return
    out.result(f"removed {repo_id}: {out.human_bytes(freed)} freed")


@models_app.command("import", epilog="Examples: sage-llm models import ~/.lmstudio/models/x/model.Q4_K_M.gguf --as "
                    "me/model | sage-llm models import ./SmolLM2-135M-Instruct.Q4_1.gguf --as sage-demo/SmolLM2 && "
                    "sage-llm start sage-demo/SmolLM2")
def import_(
    gguf: Annotated[str, typer.Argument(metavar="FILE.gguf", help="A GGUF file (Ollama, LM Studio, llama.cpp).",
                                        show_default=False)],
    as_: Annotated[str, typer.Option("--as", help="Repo id to give it, ORG/NAME; `start ORG/NAME` then serves it.",
                                     show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model of that id.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Convert a GGUF file to a bf16 safetensors checkpoint in the hub cache, with the engine environment's Python
    (gguf and accelerate are installed there when missing). vLLM serves the result like any downloaded model."""
    from sage_llm.engine.catalog import check_repo_id, import_gguf

    check_repo_id(as_)
    result = import_gguf(gguf, as_, progress=out.info, force=force)
    if json_:
        out.print_json({"repo_id": result.repo_id, "snapshot_path": result.snapshot_path,
                        "size_on_disk": result.size_on_disk, "seconds": round(result.seconds, 1),
                        "installed": result.installed})
        return
    out.result(f"imported {result.repo_id}: {out.human_bytes(result.size_on_disk)} at {result.snapshot_path} "
               f"({result.seconds:.0f} s)")
    out.hint(f"serve it: HF_HUB_OFFLINE=1 sage-llm start {result.repo_id}")


@models_app.command("recommend", epilog="Examples: sage-llm models recommend | sage-llm models recommend --json")
def recommend(json_: JsonOpt = False) -> None:
    """Curated models with the GPU memory each needs, and whether it fits the free memory of this machine's GPUs."""
    from sage_llm.engine.catalog import recommend as rows_for

    rows, gpu_error = rows_for()
    if json_:
        out.print_json({"gpu_error": gpu_error, "models": rows})
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("MODEL", "PARAMS", "QUANT", "DOWNLOAD", "GPU MEM", "FIT", "NOTE"):
        table.add_column(col, no_wrap=col != "NOTE")
    for r in rows:
        tag = f" ({r['tag']})" if r.get("tag") else ""
        table.add_row(r["repo_id"] + tag, f"{r['params_b']:g}B", r.get("quantization") or "bf16",
                      f"{r['weights_gib']:g} GiB", f"{r['min_gpu_memory_gib']:g} GiB", r["fit"], r.get("note") or "")
    out.console().print(table)
    if gpu_error:
        out.info(f"fit: no GPU ({gpu_error}); GPU MEM assumes --max-model-len 4096")
    else:
        out.info("fit: against the free memory of each GPU now; GPU MEM assumes --max-model-len 4096")


class _Bar:
    """Bytes, rate and ETA on stderr: a Rich bar in a terminal, a line every few seconds otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.progress: Any = None
        self.task: Any = None
        self.last = time.monotonic()
        self.done = 0

    def update(self, done: int, total: int | None) -> None:
        self.done = done
        if self.tty:
            if self.progress is None:
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                    TransferSpeedColumn,
                )

                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                         TransferSpeedColumn(), TimeRemainingColumn(),
                                         console=out.console(stderr=True), transient=True)
                self.progress.start()
                self.task = self.progress.add_task(self.label, total=total)
            self.progress.update(self.task, completed=done, total=total)
            return
        now = time.monotonic()
        if now - self.last >= 5:  # not a terminal: a line every 5 s (the result line says when it is done)
            self.last = now
            pct = f" ({100 * done / total:.0f}%)" if total else ""
            out.info(f"{self.label}: {out.human_bytes(done)}" + (f" of {out.human_bytes(total)}" if total else "")
                     + pct)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class StartNote:
    """For `start`: one stderr line saying whether the model is cached, or that vLLM will download it and how much.

    It is printed once the engine has been spawned (on the first progress update, or by `flush()`), so a start that
    other checks refuse still fails in one line.
    """

    def __init__(self, message: str | None) -> None:
        self.message = message

    def wrap(self, fn: Any) -> Any:
        def first_then(info: Any) -> Any:
            self.flush()
            return fn(info)

        return first_then

    def flush(self) -> None:
        if self.message:
            out.info(self.message)
            self.message = None


def announce_start(pre: Any) -> StartNote:
    """The line `start` prints about the model, from api.preflight's finding (cached, or a download of N GiB)."""
    model = pre.model
    if not pre.is_repo_id:
        return StartNote(None)
    if pre.cached:
        return StartNote(f"model {model}: cached ({out.human_bytes(pre.size_bytes)} in {pre.cache_dir})")
    size = f"about {out.human_bytes(pre.size_bytes)}" if pre.size_bytes else f"size unknown: {pre.size_error}"
    again = "; an earlier download of it is incomplete" if pre.partial else ""
    return StartNote(f"model {model}: not cached; vLLM will download it ({size}) into {pre.cache_dir}{again}")
