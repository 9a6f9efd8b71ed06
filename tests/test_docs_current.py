"""Generated files are current: docs/cli.md (from the commands' help)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gen_cli_docs  # noqa: E402


def test_cli_reference_is_current() -> None:
    text = gen_cli_docs.render()
    diff = gen_cli_docs.check(text)
    assert not diff, ("docs/cli.md is stale (a command or its help changed). Regenerate it with: "
                      f"{gen_cli_docs.REGENERATE}\n" + "\n".join(diff[:40]))


def test_cli_reference_covers_every_command() -> None:
    """Each command listed under `sage-llm` has its own section with a usage line, and every text names `sage-llm`."""
    text = gen_cli_docs.render()
    assert text.startswith("<!-- Generated")
    assert "sage llm" not in text  # help texts name the program as invoked (docs: `sage-llm`)
    llm = text.split("# `sage-llm`", 1)[1].split("\n## ", 1)[0]
    listed = [line.split("`")[1] for line in llm.split("**Commands**:", 1)[1].splitlines() if line.startswith("* `")]
    assert {"start", "stop", "status", "config"} <= set(listed)
    for name in listed:
        assert f"## `sage-llm {name}`" in text, name
        assert f"$ sage-llm {name} [OPTIONS]" in text, name
    assert "$ sage-llm config set [OPTIONS] {KEY} {VALUE}" in text
