"""`stop` sweeps the engine's own shared-memory leftovers, but never a file some live process still holds, and never
one that cannot be shown to be the engine's."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

from sage_llm.engine.process import held_shm_paths, sweep_shm


def test_sweep_removes_only_unheld_files_of_the_engine(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    owned = ["psm_1a2b", "vllm_dist_9f-tp:0-[0-1]-cpushm_0", "psm_open", "psm_mapped", "psm_child"]
    names = [*owned, "19601-tp:0-[0-1]-cpushm_1",  # named after the engine's port: its own without being seen
             "19602-tp:0-[0-1]-cpushm_1",  # another engine's port: not ours
             "psm_foreign", "vllm_dist_77-tp:0-[0-1]-cpushm_0",  # vLLM's names, created meanwhile, never seen held
             "other_app_segment"]
    for n in names:
        (shm / n).write_bytes(b"\0" * 4096)
    old = shm / "psm_old"  # from before the engine started
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    seen = {str(shm / n) for n in [*owned, "psm_old", "other_app_segment"]}
    held_fd = os.open(shm / "psm_open", os.O_RDWR)  # an fd held by a live process (this one)
    fd = os.open(shm / "psm_mapped", os.O_RDWR)
    mapped = mmap.mmap(fd, 4096)  # mapped, fd closed: only /proc/*/maps shows it
    os.close(fd)
    child = subprocess.Popen([sys.executable, "-c", "import sys,time; f=open(sys.argv[1],'rb'); print(1,flush=True);"
                              " time.sleep(60)", str(shm / "psm_child")], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"1"
        assert held_shm_paths(str(shm), {child.pid}) == {str(shm / "psm_child")}
        assert held_shm_paths(str(shm), {os.getpid()}) == {str(shm / "psm_open"), str(shm / "psm_mapped")}
        removed = sweep_shm(time.time() - 60, port=19601, shm_dir=str(shm), owned=seen)
    finally:
        child.kill()
        child.wait()
        mapped.close()
        os.close(held_fd)
    assert removed == sorted(["psm_1a2b", "vllm_dist_9f-tp:0-[0-1]-cpushm_0", "19601-tp:0-[0-1]-cpushm_1"])
    left = sorted(p.name for p in shm.iterdir())
    assert left == sorted(["19602-tp:0-[0-1]-cpushm_1", "other_app_segment", "psm_open", "psm_mapped", "psm_child",
                           "psm_old", "psm_foreign", "vllm_dist_77-tp:0-[0-1]-cpushm_0"])
    # once nothing holds them any more, a second sweep takes the rest of the engine's files
    assert sweep_shm(time.time() - 60, port=19601, shm_dir=str(shm), owned=seen) == ["psm_child", "psm_mapped",
                                                                                      "psm_open"]


def test_without_evidence_an_unheld_psm_file_of_the_engines_lifetime_stays(tmp_path):
    """psm_* names are random: one created while the engine ran may be any program's (the old sweep took it)."""
    shm = tmp_path / "shm"
    shm.mkdir()
    (shm / "psm_deadbeef").write_bytes(b"\0" * 64)
    (shm / "vllm_dist_ab-tp:0-[0-1]-cpushm_0").write_bytes(b"\0" * 64)
    assert sweep_shm(time.time() - 60, port=19601, shm_dir=str(shm)) == []
    assert sorted(p.name for p in shm.iterdir()) == ["psm_deadbeef", "vllm_dist_ab-tp:0-[0-1]-cpushm_0"]


def test_sweep_of_a_missing_directory_is_empty(tmp_path):
    assert sweep_shm(None, shm_dir=str(tmp_path / "nope")) == []
