"""Messages name our commands `sage-llm ...` (issue 21 defect 10): `sage llm ...` does not exist without SAGE, and
there it is SAGE's own `llm` group (isagellm). The CLI respells `sage-llm SUBCOMMAND` as the program typed."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import sage_llm

SRC = Path(sage_llm.__file__).parent
# the engine log's start header is a file format (old logs have it; logs.py and progress.py parse it), not a message
ALLOWED = ("===== sage llm start",)
SAGE_OWN = {"cli/sage_plugin.py", "core/sage_cli.py"}  # where `sage llm` means the command inside SAGE


def _strings(path: Path) -> list[tuple[int, str]]:
    if path.suffix != ".py":
        return [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)]
    toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    kinds = (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1))
    return [(t.start[0], t.string) for t in toks if t.type in kinds]


def test_no_message_says_sage_llm_with_a_space() -> None:
    found = []
    for path in sorted(SRC.rglob("*")):
        rel = path.relative_to(SRC).as_posix()
        if not path.is_file() or path.suffix not in (".py", ".html", ".js", ".json") or rel in SAGE_OWN:
            continue
        for line, text in _strings(path):
            for allowed in ALLOWED:
                text = text.replace(allowed, "")
            if "sage llm " in text or "sage llm`" in text:
                found.append(f"{rel}:{line}: {text.strip()[:100]}")
    assert not found, "say `sage-llm ...`:\n" + "\n".join(found)


def test_messages_through_the_cli_name_the_program_typed(cli, home) -> None:
    code, _out, err = cli("stop", "nope-no-such-engine")
    assert code != 0
    assert "sage-llm status" in err
    assert "sage llm" not in err
    code, _out, err = cli("stop", "nope-no-such-engine", prog="sage vllm")
    assert "sage vllm status" in err
    assert "sage-llm status" not in err

