"""`start --gpus/--skip-checks` and the GPU fields of `status`, end to end in-process: fake vLLM + fake NVML."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import psutil
import pytest

import sage_llm
from sage_llm.core.state import EngineRecord, StateStore
from sage_llm.observe import gpu

try:
    from tests.fakes.fake_nvml import FakeGpu, FakeNVML, FakeProc, GiB, NVMLError_DriverNotLoaded
except ModuleNotFoundError:  # tests/ not a package: its conftest put tests/ itself on sys.path
    from fakes.fake_nvml import FakeGpu, FakeNVML, FakeProc, GiB, NVMLError_DriverNotLoaded

pytestmark = pytest.mark.usefixtures("fake_vllm", "stop_all")


@pytest.fixture
def nv() -> FakeNVML:
    fake = FakeNVML([FakeGpu(total=80 * GiB, used=50 * GiB, util=91, temp=66),
                     FakeGpu(total=80 * GiB, used=1 * GiB, util=0, temp=31)])
    gpu.set_backend(fake)
    return fake


def engine_env(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


def test_start_places_on_the_freest_gpu_and_records_it(cli, nv: FakeNVML) -> None:
    code, out, err = cli("start", "org/tiny", "--json", "-u", "0.5")
    assert code == 0, err
    doc = json.loads(out)
    uuid1 = nv.devices[1].uuid
    assert [(g["index"], g["uuid"], g["chosen_by"]) for g in doc["gpus"]] == [(1, uuid1, "auto")]
    assert "GPU: 1 (most free memory)" in err
    assert engine_env(doc["pid"])["CUDA_VISIBLE_DEVICES"] == uuid1
    rec = StateStore().load(doc["name"])
    assert isinstance(rec, EngineRecord)
    assert rec.gpus[0]["uuid"] == uuid1
    assert rec.env["CUDA_VISIBLE_DEVICES"] == uuid1


def test_start_with_gpus_pins_them(cli, nv: FakeNVML) -> None:
    code, out, err = cli("start", "org/tiny", "--json", "--gpus", "1,0", "-u", "0.3", "-tp", "2")
    assert code == 0, err
    doc = json.loads(out)
    assert [g["index"] for g in doc["gpus"]] == [1, 0]
    assert engine_env(doc["pid"])["CUDA_VISIBLE_DEVICES"] == f"{nv.devices[1].uuid},{nv.devices[0].uuid}"


def test_preflight_refuses_in_one_line_and_changes_nothing(cli, nv: FakeNVML, home) -> None:
    code, out, err = cli("start", "org/tiny", "--gpus", "0")  # GPU 0: 30 GiB free, 0.9 x 80 GiB wanted
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: GPU 0 has 30.0 GiB free of 80.0 GiB, but --gpu-memory-utilization 0.9 needs")
    assert "--skip-checks" in lines[0]
    assert StateStore().names() == []


def test_skip_checks_starts_anyway(cli, nv: FakeNVML) -> None:
    code, out, err = cli("start", "org/tiny", "--gpus", "0", "--skip-checks", "--json")
    assert code == 0, err
    assert [g["index"] for g in json.loads(out)["gpus"]] == [0]


def test_bad_gpus_is_a_usage_error(cli, nv: FakeNVML) -> None:
    code, _out, err = cli("start", "org/tiny", "--gpus", "7")
    assert code == 2
    assert "no GPU 7 on this machine (GPUs: 0, 1)" in err
    assert StateStore().names() == []


def test_gpus_on_a_machine_without_gpu_is_a_clear_error(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "DRIVER_MARKERS", ("/nonexistent",))
    gpu.reset()
    code, _out, err = cli("start", "org/tiny", "--gpus", "0")
    assert code == 2
    assert "--gpus 0 was given, but no GPU is usable here: no NVIDIA driver found" in err


def test_status_sums_vram_over_the_process_tree_per_gpu(cli, nv: FakeNVML, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", "2")  # an EngineCore and a worker under the API server
    code, out, err = cli("start", "org/tiny", "--json", "-u", "0.2", "--gpus", "0,1", "-tp", "2")
    assert code == 0, err
    pid = json.loads(out)["pid"]
    kids = sorted(c.pid for c in psutil.Process(pid).children(recursive=True))
    assert len(kids) == 2
    nv.processes = {
        0: [FakeProc(kids[0], 10 * GiB), FakeProc(kids[1], 6 * GiB), FakeProc(424242, 3 * GiB)],  # 424242: not ours
        1: [FakeProc(kids[1], 6 * GiB, both=True)],
    }
    code, out, err = cli("status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    jsonschema.validate(doc, json.loads((Path(sage_llm.__file__).parent / "data" / "status.schema.json").read_text()))
    (eng,) = [e for e in doc["engines"] if e["managed"]]  # other vLLMs on this machine show up as external
    assert eng["gpu_memory_bytes"] == 22 * GiB
    assert eng["gpus"] == [
        {"index": 0, "uuid": nv.devices[0].uuid, "memory_bytes": 16 * GiB},
        {"index": 1, "uuid": nv.devices[1].uuid, "memory_bytes": 6 * GiB},
    ]
    assert doc["gpu_error"] is None
    assert [g["index"] for g in doc["gpus"]] == [0, 1]
    g0 = doc["gpus"][0]
    assert (g0["uuid"], g0["memory_total_bytes"], g0["utilization_percent"], g0["temperature_c"]) == (
        nv.devices[0].uuid, 80 * GiB, 91, 66)
    assert doc["local_engine"]["running"] is True
    assert doc["local_engine"]["gpu_memory_usage"] == 22.0

    code, out, err = cli("status")
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert "GPU MEM" in header
    assert "22.0 GiB on 0,1" in row


def test_status_without_gpu_reports_why(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "DRIVER_MARKERS", ("/nonexistent",))
    gpu.reset()
    code, out, err = cli("start", "org/tiny", "--json")
    assert code == 0, err
    assert json.loads(out)["gpus"] == []
    doc = json.loads(cli("status", "--json")[1])
    assert doc["gpus"] == []
    assert doc["gpu_error"] == gpu.NO_DRIVER
    eng = doc["engines"][0]
    assert eng["managed"]
    assert eng["gpu_memory_bytes"] is None
    assert eng["gpus"] == []
    assert doc["local_engine"]["gpu_memory_usage"] is None
    code, out, _err = cli("status")
    assert "GPU MEM" not in out


def test_status_shows_an_nvml_failure_on_stderr(cli) -> None:

    gpu.set_backend(FakeNVML([FakeGpu()], init_error=NVMLError_DriverNotLoaded))
    code, _out, err = cli("start", "org/tiny", "--json")
    assert code == 0, err
    code, _out, err = cli("status")
    assert code == 0
    assert "GPU: the NVIDIA driver is not loaded" in err
    doc = json.loads(cli("status", "--json")[1])
    assert doc["gpu_error"] == "the NVIDIA driver is not loaded"
