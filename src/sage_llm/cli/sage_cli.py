"""How sage-llm's commands are reached under SAGE's own `sage` command, when SAGE is installed.

sage-llm installs no `sage` script (SAGE's CLI and SageMath both own one). Its commands are `sage-llm ...` everywhere,
and `sage vllm ...` inside SAGE's `sage`, added by the `sage.cli.plugins` entry point
(`sage_llm.cli.sage_plugin:register`). The group is not called `llm` there: SAGE's published CLI (isage-cli 0.2.4.x,
a Typer app) has an `llm` group of its own (isagellm: status, list-models, serve, info, config); mounting ours at the
same name would hide it, and merging into it would leave two different `status` and `config` commands.

Standard library only: `sage-llm doctor` reads this without importing SAGE (whose import takes seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "vllm"  # our group's name under SAGE's `sage`
SAGE_MODULE = "sage.cli.main"
PLUGIN_GROUP = "sage.cli.plugins"
PLUGIN_VALUE = "sage_llm.cli.sage_plugin:register"


@dataclass(frozen=True)
class SageCli:
    """SAGE's `sage` console script as installed: `shape` is `typer` (published isage-cli, `sage.cli.main:app`) or
    `argparse` (SAGE's development branch, `sage.cli.main:main`)."""

    dist: str
    version: str
    shape: str
    entry: str


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
