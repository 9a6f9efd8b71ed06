"""Write docs/cli.md from the commands' own help (as `sage-llm` shows it), with Typer's generator (`typer ... utils docs`).

Run by `make docs`; `--check` exits 1 when docs/cli.md is stale (tests/test_docs_current.py does the same check).
The environment is cleaned first, so help text never shows a developer's own settings.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "cli.md"
REGENERATE = "make docs  (or: .venv/bin/python scripts/gen_cli_docs.py)"
HEADER = ("<!-- Generated from the commands' help by `make docs` (scripts/gen_cli_docs.py). Do not edit by hand: "
          "change the docstrings and help texts, then regenerate. -->\n\n")


# Typer's `utils docs`, run on `main.command("sage-llm")`: the command tree whose help texts name `sage-llm`
DOCS = """
import typer, typer.cli
from sage_llm.cli.main import command, PROG
cmd = command(PROG)
ctx = typer.Context(cmd, info_name=PROG)
ctx.ensure_object(dict)[typer.cli.MARKUP_MODE_KEY] = None
print(typer.cli.get_docs_for_click(obj=cmd, ctx=ctx, name=PROG).strip())
"""


def render() -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SAGE_", "_SAGE", "RAY_", "HF_", "VLLM_", "OPENAI_", "CUDA_"))}
    env.update({"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "PYTHONPATH": str(ROOT / "src")})
    res = subprocess.run([sys.executable, "-c", DOCS], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"typer utils docs failed ({res.returncode}): {res.stderr.strip()}")
    return HEADER + res.stdout.strip() + "\n"


def check(text: str | None = None) -> list[str]:
    """The unified diff between docs/cli.md and what it should be ([] when current)."""
    want = render() if text is None else text
    have = TARGET.read_text() if TARGET.is_file() else ""
    return list(difflib.unified_diff(have.splitlines(), want.splitlines(), "docs/cli.md (committed)",
                                     "docs/cli.md (from the help)", lineterm="", n=1))


def main(argv: list[str]) -> int:
    if "--check" in argv:
        diff = check()
        if diff:
            print("\n".join(diff[:60]), file=sys.stderr)
            print(f"docs/cli.md is stale; regenerate with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
