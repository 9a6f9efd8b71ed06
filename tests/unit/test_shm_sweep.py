"""`stop` sweeps vLLM's shared-memory leftovers, but never a file some live process still holds."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

from sage_llm.engine.process import sweep_shm


def test_sweep_removes_only_unheld_vllm_files(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    names = ["psm_1a2b", "vllm_dist_9f-tp:0-[0-1]-cpushm_0", "19601-tp:0-[0-1]-cpushm_1",
             "19602-tp:0-[0-1]-cpushm_1",  # another engine's port: not ours
             "other_app_segment", "psm_open", "psm_mapped", "psm_child"]
    for n in names:
        (shm / n).write_bytes(b"\0" * 4096)
    old = shm / "psm_old"  # from before the engine started
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    held_fd = os.open(shm / "psm_open", os.O_RDWR)  # an fd held by a live process (this one)
    fd = os.open(shm / "psm_mapped", os.O_RDWR)
    mapped = mmap.mmap(fd, 4096)  # mapped, fd closed: only /proc/*/maps shows it
    os.close(fd)
    child = subprocess.Popen([sys.executable, "-c", "import sys,time; f=open(sys.argv[1],'rb'); print(1,flush=True);"
                              " time.sleep(60)", str(shm / "psm_child")], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"1"
        removed = sweep_shm(time.time() - 60, port=19601, shm_dir=str(shm))
    finally:
        child.kill()
        child.wait()
        mapped.close()
        os.close(held_fd)
    assert removed == sorted(["psm_1a2b", "vllm_dist_9f-tp:0-[0-1]-cpushm_0", "19601-tp:0-[0-1]-cpushm_1"])
    left = sorted(p.name for p in shm.iterdir())
    assert left == sorted(["19602-tp:0-[0-1]-cpushm_1", "other_app_segment", "psm_open", "psm_mapped", "psm_child",
                           "psm_old"])
    # once nothing holds them any more, a second sweep takes the rest of vLLM's files from the engine's lifetime
    assert sweep_shm(time.time() - 60, port=19601, shm_dir=str(shm)) == ["psm_child", "psm_mapped", "psm_open"]


def test_sweep_of_a_missing_directory_is_empty(tmp_path):
    assert sweep_shm(None, shm_dir=str(tmp_path / "nope")) == []
