"""Each engine's node in the views: `status --json` (`node`), the gateway's Engine, `top` (NODE:PORT once any engine
runs on a Ray node). An engine of this machine has node null; one placed on a cluster, its node's address."""

from __future__ import annotations

import io
import time

from rich.console import Console

from sage_llm.cli.commands.top import render
from sage_llm.engine.monitor import EngineRow, Frame
from sage_llm.engine.view import EngineView


def test_status_json_names_the_node_of_a_cluster_engine_and_null_here() -> None:
    here = EngineView(name="a", managed=True, state="ready", port=8000)
    there = EngineView(name="b", managed=True, state="ready", port=8001,
                       cluster={"address": "10.0.0.1:6379", "node_id": "f" * 56, "node_address": "10.0.0.2"})
    assert here.to_json()["node"] is None
    assert there.to_json()["node"] == "10.0.0.2"
    assert there.node == "10.0.0.2"


def _screen(engines: list[EngineRow]) -> str:
    buf = io.StringIO()
    frame = Frame(at=time.time(), interval=1.0, history_s=60.0, engines=engines)
    Console(file=buf, width=220, color_system=None, force_terminal=False).print(render(frame))
    return buf.getvalue()


def test_top_shows_the_node_only_when_an_engine_runs_on_one() -> None:
    local = EngineRow(key="a", name="eng-a", state="ready", port=8000)
    screen = _screen([local])
    assert "NODE:PORT" not in screen
    assert " PORT" in screen
    remote = EngineRow(key="b", name="eng-b", state="ready", port=8001, node="10.0.0.2")
    screen = _screen([local, remote])
    assert "NODE:PORT" in screen
    assert "10.0.0.2:8001" in screen
    assert "here:8000" in screen
