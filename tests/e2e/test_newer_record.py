"""A record written by a newer sage-llm (higher schema_version) is left alone: never signalled, never removed (issue
12, §2). It may describe a live engine that only the newer version knows how to identify."""

from __future__ import annotations

import json

import psutil
import pytest

from tests.conftest import free_port
from tests.e2e.test_lifecycle_fake import engine, status_doc


@pytest.mark.usefixtures("fake_vllm", "stop_all")
def test_record_from_a_newer_sage_llm_is_left_alone_even_by_stop_force(cli, home) -> None:
    code, _out, err = cli("start", "org/Tiny-Chat", "--name", "newer", "--port", str(free_port()))
    assert code == 0, err
    path = home / "engines" / "newer.json"
    rec = json.loads(path.read_text())
    pid = rec["pid"]
    rec["schema_version"] += 1
    rec["identity_from_the_future"] = {"anything": 1}
    path.write_text(json.dumps(rec))
    written = path.read_bytes()

    for args in (("stop", "newer"), ("stop", "newer", "--force"), ("stop",), ("restart", "newer"),
                 ("switch", "newer", "org/Other")):
        code, out, err = cli(*args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) <= 2, err  # the error and its hint, no traceback
        assert "newer sage-llm" in err
        assert "upgrade sage-llm" in err
        assert path.read_bytes() == written, args
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, f"{args} signalled the engine"

    # starting under that name is refused the same way; status shows what it is
    code, _out, err = cli("start", "org/Tiny-Chat", "--name", "newer")
    assert code == 2
    assert "upgrade sage-llm" in err
    e = engine(status_doc(cli), "newer")
    assert e["state"] == "failed"
    assert "newer sage-llm" in e["error"]
    assert "upgrade sage-llm" in e["error"]

    # `stop --all` stops what it can read and still refuses (exit 2) to touch the newer record
    code, _out, err = cli("start", "org/Other", "--name", "other", "--port", str(free_port()))
    assert code == 0, err
    other_pid = json.loads((home / "engines" / "other.json").read_text())["pid"]
    code, out, err = cli("stop", "--all")
    assert code == 2, err
    assert "stopped 'other'" in out
    assert not (home / "engines" / "other.json").exists()
    assert not psutil.pid_exists(other_pid) or psutil.Process(other_pid).status() == psutil.STATUS_ZOMBIE
    assert path.read_bytes() == written
    assert psutil.Process(pid).is_running()

    # the newer sage-llm (here: the record made readable again) can still stop it
    rec["schema_version"] -= 1
    path.write_text(json.dumps(rec))
    code, out, err = cli("stop", "newer")
    assert code == 0, err
