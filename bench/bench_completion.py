"""Completion budgets (issue 8), with 20 engines recorded and 200 models in the HF cache.

* The callbacks (`_complete.engines`, `_complete.cached_models`) answer in <= 100 ms (measured: well under 1 ms).
* The round trip a TAB costs: the installed `sage-llm` / `sage` answering Typer's bash protocol in a fresh process,
  timed interleaved, in the same run, with `python -c "import typer"` and with a two-command Typer app answering the
  same protocol (the floor any Typer completion pays: parsing imports Typer's pydantic adapters).

Usage: python bench/bench_completion.py [--runs N]   (prints a JSON summary)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, machine, median


def _setup(root: Path, engines: int, models: int) -> dict[str, str]:
    from sage_llm.core.state import EngineRecord, atomic_write_json

    home = root / "home"
    (home / "engines").mkdir(parents=True, mode=0o700)
    for i in range(engines):
        rec = EngineRecord(name=f"engine-{i:02d}", model=f"org/model-{i}", served_model_name=f"org/model-{i}",
                           host="127.0.0.1", port=19500 + i)
        atomic_write_json(home / "engines" / f"{rec.name}.json", rec.to_json())
    cache = root / "hf"
    for i in range(models):
        (cache / f"models--org{i % 9}--model-{i:03d}" / "snapshots").mkdir(parents=True)
    # as installed: bytecode caches allowed (a dev shell with PYTHONDONTWRITEBYTECODE=1 recompiles every module of
    # the editable checkout on each TAB, which measures the compiler, not the program)
    env = {k: v for k, v in os.environ.items() if not k.startswith("_SAGE") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update({"SAGE_LLM_HOME": str(home), "HF_HUB_CACHE": str(cache), "SAGE_LLM_DOTENV": "",
                "SAGE_LLM_CONFIG": str(root / "llm.toml")})
    return env


def _tab(prog: str, words: str, cword: int, env: dict[str, str]) -> tuple[float, list[str]]:
    e = {**env, "_SAGE_LLM_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    t = time.perf_counter()
    res = subprocess.run([str(BIN / prog)], env=e, capture_output=True, text=True, check=False)
    return time.perf_counter() - t, res.stdout.split()


MINI_APP = """
import typer
app = typer.Typer()
@app.callback()
def root(version: bool = False) -> None: ...
@app.command()
def stop(name: str = typer.Argument(None, autocompletion=lambda: ["a", "b"])) -> None: ...
app(prog_name="mini")
"""


def _floor(env: dict[str, str], what: str) -> float:
    """`import typer`, or a two-command Typer app answering the same completion protocol (the Typer floor)."""
    if what == "import":
        cmd, e = [sys.executable, "-c", "import typer"], env
    else:
        cmd = [sys.executable, "-c", MINI_APP]
        e = {**env, "_MINI_COMPLETE": "complete_bash", "COMP_WORDS": "mini stop ", "COMP_CWORD": "2"}
    t = time.perf_counter()
    subprocess.run(cmd, env=e, capture_output=True, check=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    cases = {
        "sage-llm stop <TAB> (engine names + ports)": ("sage-llm", "sage-llm stop ", 2),
        "sage-llm start org3/<TAB> (cached models)": ("sage-llm", "sage-llm start org3/", 2),
        "sage-llm <TAB> (commands)": ("sage-llm", "sage-llm ", 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        env = _setup(Path(tmp), engines=20, models=200)
        for prog, words, cword in cases.values():  # warm-up: writes the bytecode caches once
            _tab(prog, words, cword, env)
        os.environ.update({k: env[k] for k in ("SAGE_LLM_HOME", "HF_HUB_CACHE")})
        from sage_llm.cli import _complete

        cb = {"engines": [], "cached_models": []}
        for _ in range(200):
            t = time.perf_counter()
            n_eng = len(_complete.engines(""))
            cb["engines"].append(time.perf_counter() - t)
            t = time.perf_counter()
            n_mod = len(_complete.cached_models(""))
            cb["cached_models"].append(time.perf_counter() - t)
        assert (n_eng, n_mod) == (40, 200), (n_eng, n_mod)

        timings: dict[str, list[float]] = {name: [] for name in cases}
        floor: list[float] = []
        mini: list[float] = []
        counts: dict[str, int] = {}
        for _ in range(args.runs):  # interleaved, so machine load hits all alike
            floor.append(_floor(env, "import"))
            mini.append(_floor(env, "mini"))
            for name, (prog, words, cword) in cases.items():
                took, out = _tab(prog, words, cword, env)
                timings[name].append(took)
                counts[name] = len(out)
    result = {
        "machine": machine(),
        "runs": args.runs,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "callbacks_ms": {k: {"median": round(median(v) * 1000, 3), "max": round(max(v) * 1000, 3)}
                         for k, v in cb.items()},
        "round_trip_ms": {k: {"median": round(median(v) * 1000, 1), "max": round(max(v) * 1000, 1),
                              "candidates": counts[k]} for k, v in timings.items()},
        "python_import_typer_ms": {"median": round(median(floor) * 1000, 1), "max": round(max(floor) * 1000, 1)},
        "minimal_typer_app_tab_ms": {"median": round(median(mini) * 1000, 1), "max": round(max(mini) * 1000, 1)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
