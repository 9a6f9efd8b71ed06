"""`sage llm doctor [--json]`: ok / warn / fail per check with the fix, exit 1 on any failure, secrets never shown."""

from __future__ import annotations

import json
import os
import socket
from collections import namedtuple
from pathlib import Path

import pytest

from sage_llm import doctor
from sage_llm.observe import gpu
from tests.support.ports import free_port

try:
    from tests.fakes.fake_nvml import FakeGpu, FakeNVML, GiB, NVMLError_LibraryNotFound
except ModuleNotFoundError:  # tests/ not a package: its conftest put tests/ itself on sys.path
    from fakes.fake_nvml import FakeGpu, FakeNVML, GiB, NVMLError_LibraryNotFound

TOKEN = "hf_doctorTestTokenNeverShown123"


@pytest.fixture
def nv() -> FakeNVML:
    fake = FakeNVML([FakeGpu(total=80 * GiB, used=2 * GiB)])
    fake.nvmlSystemGetDriverVersion = lambda: b"550.54.15"  # type: ignore[attr-defined]
    fake.nvmlSystemGetCudaDriverVersion = lambda: 12040  # type: ignore[attr-defined]
    gpu.set_backend(fake)
    return fake


@pytest.fixture
def healthy(fake_vllm: str, nv: FakeNVML, monkeypatch: pytest.MonkeyPatch) -> int:
    """The local engine port (reserved for the test, nothing listens there)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    port = free_port()
    monkeypatch.setenv("SAGE_LOCAL_ENGINE_PORT", str(port))
    return port


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def test_healthy_machine_passes_and_never_prints_the_token(cli, healthy: int) -> None:
    code, stdout, stderr = cli("doctor", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["ok"] is True
    assert doc["summary"]["fail"] == 0
    checks = by_name(doc)
    assert checks["engine"]["status"] == "ok"
    assert "0.32.0+fake" in checks["engine"]["message"]
    assert checks["nvml"]["message"].startswith("NVML works (driver 550.54.15, CUDA 12.4), 1 GPU(s)")
    assert checks["gpu0"]["status"] == "ok"
    assert "78.0 GiB free of 80.0 GiB" in checks["gpu0"]["message"]
    assert checks["port"] == {"name": "port", "status": "ok", "message": f"port {healthy} on 127.0.0.1 is free",
                              "fix": None}
    assert checks["hf_token"]["message"] == "Hugging Face token set (from $HF_TOKEN)"
    assert TOKEN not in stdout + stderr

    code, stdout, stderr = cli("doctor")
    assert code == 0
    assert TOKEN not in stdout + stderr
    assert stdout.splitlines()[0].startswith("ok    settings valid")
    assert "0 failure(s)" in stderr


def test_missing_engine_fails_with_the_install_fix(cli, nv: FakeNVML, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, stdout, _ = cli("doctor")
    assert code == 1
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("fail") and "no vLLM found" in line)
    assert "sage-llm engine install" in lines[i + 1]  # named as invoked
    assert lines[i + 1].startswith("      fix: ")


def test_busy_gpu_and_busy_port_are_warnings_with_fixes(cli, healthy: int, nv: FakeNVML, monkeypatch) -> None:
    nv.devices[0].used = 70 * GiB
    with socket.socket() as s:
        for _ in range(20):  # another program may take the reserved port before we bind it: take another then
            try:
                s.bind(("127.0.0.1", healthy))
                break
            except OSError:
                healthy = free_port()
                monkeypatch.setenv("SAGE_LOCAL_ENGINE_PORT", str(healthy))
        s.listen()
        code, stdout, _ = cli("doctor", "--json")
    assert code == 0  # warnings only
    checks = by_name(json.loads(stdout))
    assert checks["gpu0"]["status"] == "warn"
    assert "less than the 0.9 share" in checks["gpu0"]["message"]
    assert "sage-llm config set gpu_util 0.07" in checks["gpu0"]["fix"]
    assert checks["port"]["status"] == "warn"
    assert f"port {healthy} is in use" in checks["port"]["message"]
    assert "local_engine_port" in checks["port"]["fix"]


def test_invalid_setting_fails(cli, healthy: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_LOCAL_ENGINE_GPU_UTIL", "3")
    code, stdout, _ = cli("doctor", "--json")
    assert code == 1
    doc = json.loads(stdout)
    assert doc["ok"] is False
    bad = by_name(doc)["settings"]
    assert bad["status"] == "fail"
    assert "gpu_util" in bad["message"]


def test_no_driver_is_a_warning_on_cpu_and_a_failure_for_the_gpu_build() -> None:
    gpu.set_backend(FakeNVML(init_error=NVMLError_LibraryNotFound))
    [c] = doctor.check_gpus(0.9, "cpu")
    assert c.status == "warn"
    assert "CPU build" in c.message
    gpu.set_backend(FakeNVML(init_error=NVMLError_LibraryNotFound))
    [c] = doctor.check_gpus(0.9, "gpu")
    assert c.status == "fail"
    assert "--cpu" in c.fix


def test_state_dir_checks(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [c] = doctor.check_state_dir()
    assert (c.status, "created 0700 on first use" in c.message) == ("ok", True)
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    [c] = doctor.check_state_dir()
    assert c.status == "warn"
    assert c.fix == f"chmod 700 {home}"
    os.chmod(home, 0o700)
    assert doctor.check_state_dir()[0].status == "ok"
    link = tmp_path / "link-home"
    link.symlink_to(home)
    monkeypatch.setenv("SAGE_LLM_HOME", str(link))
    [c] = doctor.check_state_dir()
    assert c.status == "fail"
    assert "symlink" in c.message


def test_hf_cache_disk_space(monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(100 * GiB, 99 * GiB, 1 * GiB))
    [c] = doctor.check_hf_cache()
    assert c.status == "fail"
    assert "1.0 GiB free" in c.message
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(100 * GiB, 90 * GiB, 10 * GiB))
    assert doctor.check_hf_cache()[0].status == "warn"
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(100 * GiB, 10 * GiB, 90 * GiB))
    [c] = doctor.check_hf_cache()
    assert c.status == "ok"
    assert os.environ["HF_HUB_CACHE"] in c.message


def test_offline_and_token_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline, token = doctor.check_hf_access()
    assert "HF_HUB_OFFLINE=1" in offline.message
    assert token.status == "ok"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert doctor.check_hf_access()[1].status == "warn"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text(TOKEN)
    _, token = doctor.check_hf_access()
    assert token.status == "ok"
    assert str(tmp_path / "hf" / "token") in token.message
    assert TOKEN not in token.message
