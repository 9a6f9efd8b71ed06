"""Write completions/<shell>/<file> for `sage-llm` (bash, zsh, fish). Run by `make completions`.

The scripts are what the installed command prints for Typer's completion protocol (`_SAGE_LLM_COMPLETE=source_bash
sage-llm`, the same text `sage-llm --show-completion bash` prints). sage-llm installs no `sage` command, so there is
no script for it (completion of `sage vllm ...` inside SAGE's `sage` is SAGE's, and stops at `vllm`). They only hand the command line back to the command, so they
change only when the program name or Typer's protocol changes; the candidates themselves (commands, options, engine
names, ports, cached models) are computed live. `--check` exits 1 when a file is missing or stale.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "completions"
PROGS = {"sage-llm": "_SAGE_LLM_COMPLETE"}
FILES = {"bash": "{prog}", "zsh": "_{prog}", "fish": "{prog}.fish"}  # the names each shell's loader looks for


def script(prog: str, shell: str) -> str:
    """The completion script the installed `prog` prints for `shell`."""
    sys.path.insert(0, str(ROOT / "src"))
    from sage_llm.cli.main import run

    var = PROGS[prog]
    old = os.environ.get(var)
    os.environ[var] = f"source_{shell}"
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            code = run([], prog)
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old
    if code != 0:
        raise RuntimeError(f"{prog}: completion source for {shell} failed with exit code {code}")
    return buf.getvalue().strip() + "\n"


def expected() -> dict[Path, str]:
    return {OUT / shell / name.format(prog=prog): script(prog, shell) for prog in PROGS for shell, name in
            FILES.items()}


def main(argv: list[str]) -> int:
    files = expected()
    extra = sorted(p for p in OUT.glob("*/*") if p not in files)  # e.g. the former `sage` scripts
    if "--check" in argv:
        stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text] + extra
        for p in stale:
            print(f"stale, missing or not ours: {p.relative_to(ROOT)}", file=sys.stderr)
        if stale:
            print("regenerate with: make completions", file=sys.stderr)
        return 1 if stale else 0
    for path in extra:
        path.unlink()
        print(f"removed {path.relative_to(ROOT)}")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
