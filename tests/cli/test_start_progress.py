"""`start --wait` progress on stderr: plain lines when not a terminal; the Rich block in a terminal."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from sage_llm.cli._progress import LoadDisplay
from sage_llm.observe.progress import LoadProgress


@pytest.mark.usefixtures("stop_all")
def test_plain_progress_lines_when_stderr_is_not_a_terminal(cli, fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "3")
    code, out, err = cli("start", "org/tiny", "--name", "tiny")
    assert code == 0, err
    assert "ready" in out  # the result line, on stdout
    assert "\x1b[" not in err  # no cursor movement when piped
    lines = err.splitlines()
    shards = [ln for ln in lines if "tiny: loading weights (" in ln]
    assert shards, err
    assert all(" shards) " in ln and ln.endswith("%") for ln in shards)
    summary = [ln for ln in lines if "tiny loaded in" in ln]
    assert summary, err
    assert "loading weights" in summary[0]
    # stage lines come in order
    order = [s for s in ("resolving config", "loading weights", "starting HTTP server") if any(s in ln for ln in lines)]
    assert order == ["resolving config", "loading weights", "starting HTTP server"]


@pytest.mark.usefixtures("stop_all")
def test_no_progress_with_json_output_on_stdout(cli, fake_vllm) -> None:
    code, out, _err = cli("start", "org/tiny", "--name", "tiny", "--json")
    assert code == 0
    assert json.loads(out)["state"] == "ready"


def _info_from_log(text: str, tmp_path: Path, elapsed: float) -> dict:
    log = tmp_path / "e.log"
    log.write_text(text)
    ticks = [100.0, 100.0]  # the parser is created at t=100; every later reading of the clock is 2 s on

    def clock() -> float:
        ticks.append(ticks[-1] + 2.0 if len(ticks) > 1 else 100.0)
        return ticks.pop(0)

    lp = LoadProgress(log, offset=0, clock=clock)
    snap = lp.poll()

    class Rec:
        name = "qwen"

    return {"elapsed_s": elapsed, "log_line": snap.last_line, "record": Rec(), "stage": snap.stage,
            "progress": snap.progress, "detail": snap.detail, "stage_elapsed_s": 1.5, "snapshot": snap}


def test_terminal_block_shows_stage_bar_times_and_log_line(tmp_path: Path) -> None:
    from rich.console import Console

    info = _info_from_log(
        "(APIServer pid=1) INFO 11-25 10:00:01 [model.py:744] Resolved architecture: Qwen2ForCausalLM\n"
        "Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:01<00:01, 1.2it/s]\n", tmp_path, 12.25)
    buf = io.StringIO()
    console = Console(file=buf, width=120, color_system=None, force_terminal=False)
    console.print(LoadDisplay(tty=True).renderable(info))
    text = buf.getvalue()
    assert "qwen: loading weights" in text
    assert "50%" in text
    assert "━" in text  # the bar
    assert "1.5 s  (total 12.2 s)" in text
    assert "2/4 shards" in text
    assert "done: launching 2.0 s" in text
    assert "Loading safetensors checkpoint shards:  50% Completed | 2/4" in text


def test_summary_lists_stage_times_once_ready(tmp_path: Path) -> None:
    now = [0.0]
    log = tmp_path / "e.log"
    log.write_text("")
    lp = LoadProgress(log, offset=0, clock=lambda: now[0])
    with open(log, "a") as fh:
        for t, line in [(1.0, "(APIServer pid=1) INFO 11-25 10:00:01 [model.py:744] Resolved architecture: X\n"),
                        (3.0, "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:01<00:00]\n"),
                        (9.0, "INFO:     Application startup complete.\n")]:
            now[0] = t
            fh.write(line)
            fh.flush()
            lp.poll()

    class Rec:
        name = "qwen"

    d = LoadDisplay(tty=False)
    d.update({"elapsed_s": 9.0, "record": Rec(), "stage": "ready", "progress": 1.0, "detail": None,
              "stage_elapsed_s": 0.0, "snapshot": lp.snapshot, "log_line": None})
    assert d.summary() == "qwen loaded in 9.0 s: launching 1.0 s, resolving config 2.0 s, loading weights 6.0 s"
