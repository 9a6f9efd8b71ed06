"""How sage-llm's commands are reached under SAGE's own `sage` command, when SAGE is installed: which names they get.

sage-llm installs no `sage` script (SAGE's CLI and SageMath both own one). Its commands are `sage-llm ...` everywhere,
and inside SAGE's `sage` they are added by the `sage.cli.plugins` entry point (`sage_llm.cli.sage_plugin:register`)
under two names, chosen by `choose_names` when SAGE loads the plugin:

* `vllm`, always (unless SAGE or another plugin has a `vllm` already: then nothing of ours goes there);
* `llm`, where it is free: SAGE's published CLI (isage-cli 0.2.4.x, a Typer app) has an `llm` group of its own
  (isagellm: status, list-models, serve, info, config), which stays SAGE's; SAGE's development branch retired its
  `sage llm` (its CHANGELOG, 2026-03-13), so there `sage llm ...` is ours. A plugin whose entry point is named `llm`
  keeps the name too, whenever it is loaded.

Standard library only, and below the CLI (core/): `sage-llm doctor` reads this without importing SAGE (whose import
takes seconds) or our CLI; `names_in_sage()` runs SAGE's `sage --help` in a child process to learn what it gave us.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

GROUP = "vllm"  # our name under SAGE's `sage`, always
LLM = "llm"  # and this one where it is free
SAGE_MODULE = "sage.cli.main"
PLUGIN_GROUP = "sage.cli.plugins"
PLUGIN_VALUE = "sage_llm.cli.sage_plugin:register"
REPORT_VAR = "SAGE_LLM_SAGE_NAMES_REPORT"  # register() writes the names it took into this file (names_in_sage)


@dataclass(frozen=True)
class SageCli:
    """SAGE's `sage` console script as installed: `shape` is `typer` (published isage-cli, `sage.cli.main:app`) or
    `argparse` (SAGE's development branch, `sage.cli.main:main`)."""

    dist: str
    version: str
    shape: str
    entry: str


@dataclass(frozen=True)
class Name:
    """One name of ours under SAGE's `sage`: whether we got it, and why."""

    name: str
    got: bool
    why: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose_names(taken: Collection[str], other_plugins: Collection[str]) -> list[Name]:
    """The names our plugin takes in a `sage` whose commands are `taken` when it runs; `other_plugins`: the entry
    point names of the other `sage.cli.plugins` (one loaded after us keeps its name: we do not take it first)."""
    if GROUP in taken:
        vllm = Name(GROUP, False, f"SAGE's `sage` or another plugin has a `{GROUP}` command already")
    else:
        vllm = Name(GROUP, True, "always ours")
    if LLM in taken:
        llm = Name(LLM, False, f"SAGE's `sage` has an `{LLM}` command of its own (the published CLI's isagellm group)")
    elif LLM in other_plugins:
        llm = Name(LLM, False, f"another plugin is registered as `{LLM}`")
    else:
        llm = Name(LLM, True, "free: neither SAGE nor another plugin has it")
    return [vllm, llm]


def other_plugins() -> set[str]:
    """The entry point names of the `sage.cli.plugins` that are not ours."""
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group=PLUGIN_GROUP) if ep.value.replace(" ", "") != PLUGIN_VALUE}


def report(shape: str, names: list[Name]) -> None:
    """Write the names register() took into the file REPORT_VAR names (only `names_in_sage` sets it)."""
    path = os.environ.get(REPORT_VAR)
    if path:
        try:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump({"shape": shape, "names": [n.to_json() for n in names]}, fh)
        except OSError:  # the asker (doctor) then says it could not learn the names; SAGE's `sage` goes on
            pass


def installed() -> SageCli | None:
    """SAGE's CLI when an installed distribution declares the console script `sage = sage.cli.main:...`; None otherwise
    (no SAGE, or only another package's `sage` such as SageMath's)."""
    from importlib.metadata import distributions

    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group != "console_scripts" or ep.name != "sage":
                continue
            value = ep.value.replace(" ", "")
            if value.startswith(SAGE_MODULE + ":"):
                shape = "typer" if value.endswith(":app") else "argparse"
                return SageCli(dist.metadata["Name"] or "?", dist.version, shape, value)
    return None


def plugin_registered() -> bool:
    """True when our `sage.cli.plugins` entry point is installed (SAGE finds it through the package metadata)."""
    from importlib.metadata import entry_points

    return any(ep.value.replace(" ", "") == PLUGIN_VALUE for ep in entry_points(group=PLUGIN_GROUP))


def names_in_sage(cli: SageCli, timeout: float = 60.0) -> list[Name] | str:
    """The names SAGE's `sage` gives our commands, asked of SAGE itself: `sage --help` runs in a child process (this
    Python, SAGE's entry `cli.entry`) and our plugin reports what it took. A string says why it could not be asked."""
    module, _, attr = cli.entry.partition(":")
    code = ("import importlib, sys\n"
            "sys.argv = ['sage', '--help']\n"
            f"getattr(importlib.import_module({module!r}), {attr!r})()\n")
    fd, path = tempfile.mkstemp(prefix="sage-llm-names-", suffix=".json")  # 0600
    os.close(fd)
    try:
        try:
            subprocess.run([sys.executable, "-c", code], env={**os.environ, REPORT_VAR: path}, timeout=timeout,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`sage --help` did not finish ({type(exc).__name__})"
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
            return [Name(str(n["name"]), bool(n["got"]), str(n["why"])) for n in doc["names"]]
        except (OSError, ValueError, KeyError, TypeError):
            return "SAGE's `sage` did not load sage-llm's plugin"
    finally:
        os.unlink(path)
