"""Log reading: tail from the end, --since by the times on the lines, follow through truncation and rotation."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from sage_llm.observe import logs

LOGS = Path(__file__).resolve().parent.parent / "fixtures" / "vllm-logs"


def test_tail_matches_the_file_end_and_shows_redrawn_bars_once(tmp_path: Path) -> None:
    f = tmp_path / "e.log"
    f.write_bytes(b"a\nb\n\nCapturing CUDA graphs:  0%| 0/51\rCapturing CUDA graphs: 37%| 19/51\r"
                  b"Capturing CUDA graphs: 100%| 51/51\nlast\n")
    assert logs.tail(f, 3) == ["", "Capturing CUDA graphs: 100%| 51/51", "last"]
    assert logs.tail(f, 100) == ["a", "b", "", "Capturing CUDA graphs: 100%| 51/51", "last"]
    assert logs.tail(f, 0) == []


def test_tail_without_final_newline_and_small_blocks(tmp_path: Path) -> None:
    f = tmp_path / "e.log"
    text = "".join(f"line {i}\n" for i in range(1000)) + "partial"
    f.write_text(text)
    assert logs.tail(f, 3) == ["line 998", "line 999", "partial"]
    assert list(logs._reverse_lines(f, block=7))[:2] == ["partial", "line 999"]
    assert list(reversed(list(logs._reverse_lines(f, block=5)))) == text.split("\n")


def test_tail_of_a_real_log_equals_the_last_lines() -> None:
    path = LOGS / "cpu-compiled.log"
    expected = path.read_text().split("\n")[:-1][-40:]
    assert logs.tail(path, 40) == [logs.screen_line(x) for x in expected]


def test_tail_seeks_from_the_end_of_a_huge_file(tmp_path: Path) -> None:
    f = tmp_path / "huge.log"
    with open(f, "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB (sparse): reading it all would take seconds
        fh.seek(0, os.SEEK_END)
        fh.write(b"".join(b"(APIServer pid=1) INFO 11-25 10:00:00 [x.py:1] line %d\n" % i for i in range(500)))
    t0 = time.perf_counter()
    out = logs.tail(f, 100)
    took = time.perf_counter() - t0
    assert len(out) == 100
    assert out[-1].endswith("line 499")
    assert took < 0.1


def test_parse_duration() -> None:
    assert logs.parse_duration("90s") == 90
    assert logs.parse_duration("10m") == 600
    assert logs.parse_duration("1h30m") == 5400
    assert logs.parse_duration("2d") == 172800
    assert logs.parse_duration("45") == 45
    for bad in ("", "soon", "10x", "m10"):
        with pytest.raises(ValueError):
            logs.parse_duration(bad)


def test_since_uses_vllm_timestamps_and_keeps_untimed_lines_with_theirs(tmp_path: Path) -> None:
    now = datetime(2026, 11, 25, 10, 0, 0)
    f = tmp_path / "e.log"
    f.write_text(
        "(APIServer pid=1) INFO 11-25 09:40:00 [a.py:1] old\n"
        "Traceback of the old line\n"
        "(APIServer pid=1) INFO 11-25 09:55:00 [a.py:1] recent\n"
        "Loading safetensors checkpoint shards: 100% Completed | 1/1\n"
        "(EngineCore pid=2) WARNING 11-25 09:59:30 [b.py:2] newest\n"
    )
    got = logs.since(f, 600, now=now.timestamp())
    assert got == ["(APIServer pid=1) INFO 11-25 09:55:00 [a.py:1] recent",
                   "Loading safetensors checkpoint shards: 100% Completed | 1/1",
                   "(EngineCore pid=2) WARNING 11-25 09:59:30 [b.py:2] newest"]
    assert logs.since(f, 10, now=now.timestamp()) == []
    assert len(logs.since(f, 86400, now=now.timestamp())) == 5


def test_since_on_a_real_log() -> None:
    path = LOGS / "cpu-kill.log"  # 08:01:10 .. 08:01:50 on 11-25
    now = datetime(datetime.now().year, 11, 25, 8, 1, 50).timestamp()
    got = logs.since(path, 5, now=now)
    assert got
    assert all("08:01:4" in ln or "08:01:5" in ln for ln in got if logs.line_time(ln))
    assert "[shutdown]" in got[0]


def _script(f: Path, *steps: Callable[[], None], start_at_end: bool = True) -> list[logs.Event]:
    """Run `follow` with each step done when it next waits (it has read everything written so far): no threads and
    no sleeps, so what it sees does not depend on timing. Ends after the last step has been read."""
    todo = list(steps)

    def wait(_seconds: float) -> None:
        if todo:
            todo.pop(0)()

    gen = logs.follow(f, stop=lambda: None if todo else "done", poll=0, check_every=0, start_at_end=start_at_end,
                      sleep=wait)
    return list(gen)


def _append(f: Path, text: str) -> Callable[[], None]:
    def step() -> None:
        with open(f, "a") as fh:
            fh.write(text)
    return step


def _rewrite(f: Path, text: str) -> Callable[[], None]:
    """Truncate and write `text` (what `: > file` then a writer does, or copytruncate then the engine's next lines)."""
    def step() -> None:
        with open(f, "w") as fh:
            fh.write(text)
    return step


def test_follow_new_lines_truncation_and_rotation(tmp_path: Path) -> None:
    f = tmp_path / "e.log"
    f.write_text("before\n")

    def rotate() -> None:
        with open(f, "a") as fh:
            fh.write("last of old\n")
        os.replace(f, tmp_path / "e.log.1")
        f.write_text("new file\n")

    events = _script(f, _append(f, "one\ntw"), _append(f, "o\n"), _rewrite(f, ""), _append(f, "after truncate\n"),
                     rotate)
    lines = [e.text for e in events if e.kind == "line"]
    assert lines == ["one", "two", "after truncate", "last of old", "new file"]
    notices = [e.text for e in events if e.kind == "notice"]
    assert notices == ["log truncated: reading e.log from the start", "log rotated: reading the new e.log"]
    assert events[-1] == logs.Event("end", "done")


@pytest.mark.parametrize("new", ["AFTER!\n", "AFTER, and longer\n", "short\n"])
def test_follow_sees_a_file_truncated_and_rewritten_to_the_same_length_or_longer(tmp_path: Path, new: str) -> None:
    """Truncated, then written again before follow looked: to exactly the length it had read (the size alone says
    nothing happened), longer (the size says "appended"), or shorter. Every new line is read, from the top."""
    f = tmp_path / "e.log"
    f.write_text("before\n")  # 7 bytes, already read (follow starts at the end)
    events = _script(f, _rewrite(f, new))
    assert [e.text for e in events if e.kind == "line"] == [new.rstrip("\n")]
    assert [e.text for e in events if e.kind == "notice"] == ["log truncated: reading e.log from the start"]


def test_follow_rewritten_after_reading_from_the_start(tmp_path: Path) -> None:
    f = tmp_path / "e.log"
    f.write_text("")
    events = _script(f, _append(f, "first run\n"), _rewrite(f, "other run\n"), start_at_end=False)
    assert [e.text for e in events if e.kind == "line"] == ["first run", "other run"]


def test_follow_does_not_see_a_truncation_in_plain_appends(tmp_path: Path) -> None:
    """Many appends, some larger than the anchor it compares: never a false "truncated"."""
    f = tmp_path / "e.log"
    f.write_text("x" * 10000 + "\n")
    steps = [_append(f, f"line {i} " + "y" * (i * 1500) + "\n") for i in range(6)]
    events = _script(f, *steps)
    assert [e.kind for e in events].count("notice") == 0
    assert [e.text.split(" ")[:2] for e in events if e.kind == "line"] == [["line", str(i)] for i in range(6)]


def test_follow_flushes_the_last_partial_line_at_the_end(tmp_path: Path) -> None:
    f = tmp_path / "e.log"
    f.write_text("")
    calls = []

    def stop() -> str | None:
        calls.append(1)
        if len(calls) == 1:
            with open(f, "a") as fh:
                fh.write("full\nno newline")
            return None
        return "engine 'x' exited"

    events = list(logs.follow(f, stop=stop, poll=0.01, check_every=0))
    assert [e.text for e in events] == ["full", "no newline", "engine 'x' exited"]


def test_tail_to_the_last_complete_line_then_follow_from_there_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """The web panel's log stream: a tail ending at `complete_end()` and a follow starting there show every line
    exactly once, including one being written (no newline yet) at the moment of the tail and ones written later."""
    f = tmp_path / "e.log"
    f.write_bytes(b"one\ntwo\nthree\npart")
    end = logs.complete_end(f, block=4)  # small blocks: the search crosses block edges
    assert end == len(b"one\ntwo\nthree\n")
    assert logs.tail(f, 2, end) == ["two", "three"]
    assert logs.tail(f, 10, end) == ["one", "two", "three"]
    with open(f, "ab") as fh:
        fh.write(b"ial\nfour\n")
    calls = iter([None, None, "done"])
    got = [e.text for e in logs.follow(f, stop=lambda: next(calls), poll=0.01, check_every=0, start_offset=end)
           if e.kind == "line"]
    assert got == ["partial", "four"]
    assert logs.complete_end(tmp_path / "absent.log") == 0
    (tmp_path / "nl.log").write_bytes(b"no newline at all")
    assert logs.complete_end(tmp_path / "nl.log") == 0
