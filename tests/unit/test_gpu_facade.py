"""The NVML facade (sage_llm.observe.gpu) against a fake NVML: laziness, no-driver reasons, fields, defaults,
processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sage_llm.core.errors import UsageError
from sage_llm.observe import gpu

try:
    from tests.fakes.fake_nvml import (
        FakeGpu,
        FakeNVML,
        FakeProc,
        GiB,
        NVMLError_DriverNotLoaded,
        NVMLError_GpuIsLost,
        NVMLError_LibraryNotFound,
        NVMLError_NoPermission,
    )
except ModuleNotFoundError:  # tests/ not a package: its conftest put tests/ itself on sys.path
    from fakes.fake_nvml import (
        FakeGpu,
        FakeNVML,
        FakeProc,
        GiB,
        NVMLError_DriverNotLoaded,
        NVMLError_GpuIsLost,
        NVMLError_LibraryNotFound,
        NVMLError_NoPermission,
    )


def two_gpus() -> FakeNVML:
    return FakeNVML(
        [FakeGpu(total=80 * GiB, used=30 * GiB, util=87, temp=61, power_mw=312_500, limit_mw=700_000),
         FakeGpu(total=24 * GiB, used=1 * GiB, name="NVIDIA L4", util=3, temp=35, power_mw=16_000, limit_mw=72_000)],
        processes={0: [FakeProc(100, 20 * GiB), FakeProc(101, 9 * GiB, graphics=True)], 1: [FakeProc(100, 512 << 20)]},
    )


def test_injecting_a_backend_does_not_initialise_it() -> None:
    nv = two_gpus()
    gpu.set_backend(nv)
    assert nv.calls["nvmlInit"] == 0
    assert not gpu.initialised()
    assert gpu.gpu_count() == 2
    assert nv.calls["nvmlInit"] == 1
    gpu.snapshot()
    assert nv.calls["nvmlInit"] == 1  # once per process


def test_import_and_no_driver_never_import_pynvml() -> None:
    # no driver, whatever this machine has: the driver files are looked for only when a snapshot is taken
    code = ("import sys; import sage_llm.observe.gpu as g; assert 'pynvml' not in sys.modules; "
            "g.DRIVER_MARKERS = ('/nonexistent/sage-llm-test/nvidiactl',); s = g.snapshot(); "
            "print(len(s.gpus), repr(s.error), 'pynvml' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == f"0 {gpu.NO_DRIVER!r} False"


def test_no_driver_files_gives_zero_gpus_and_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "DRIVER_MARKERS", ("/nonexistent/nvidiactl",))
    gpu.reset()
    snap = gpu.snapshot()
    assert snap.gpus == []
    assert snap.processes == []
    assert snap.error == gpu.NO_DRIVER
    assert gpu.gpu_count() == 0
    assert gpu.error() == gpu.NO_DRIVER


@pytest.mark.parametrize(("exc", "words"), [
    (NVMLError_LibraryNotFound, "library not found"),
    (NVMLError_DriverNotLoaded, "driver is not loaded"),
    (NVMLError_NoPermission, "no permission"),
])
def test_init_errors_become_reasons(exc: type[Exception], words: str) -> None:
    nv = FakeNVML([FakeGpu()], init_error=exc)
    gpu.set_backend(nv)
    snap = gpu.snapshot()
    assert snap.gpus == []
    assert words in (snap.error or "").lower()
    assert gpu.gpu_count() == 0
    assert nv.calls["nvmlDeviceGetCount"] == 0


def test_fields_per_gpu() -> None:
    gpu.set_backend(two_gpus())
    snap = gpu.snapshot(with_processes=False)
    assert snap.error is None
    assert snap.processes == []
    g0, g1 = snap.gpus
    assert (g0.index, g0.name, g0.uuid) == (0, "NVIDIA H100 80GB HBM3", "GPU-00000000-aaaa-bbbb-cccc-000000000000")
    assert (g0.memory_total_bytes, g0.memory_used_bytes, g0.memory_free_bytes) == (80 * GiB, 30 * GiB, 50 * GiB)
    assert (g0.utilization_percent, g0.temperature_c, g0.power_draw_w, g0.power_limit_w) == (87, 61, 312.5, 700.0)
    assert g1.name == "NVIDIA L4"
    assert g1.memory_free_bytes == 23 * GiB
    j = g0.to_json()
    assert j["memory_free_bytes"] == 50 * GiB
    assert j["uuid"].startswith("GPU-")


def test_unsupported_fields_read_as_none_not_errors() -> None:
    nv = FakeNVML([FakeGpu(util=None, temp=None, power_mw=None, limit_mw=None), FakeGpu()])
    nv.fail("nvmlDeviceGetName", index=1)
    nv.fail("nvmlDeviceGetMemoryInfo", NVMLError_GpuIsLost, index=1)
    gpu.set_backend(nv)
    g0, g1 = gpu.snapshot().gpus
    assert (g0.utilization_percent, g0.temperature_c, g0.power_draw_w, g0.power_limit_w) == (None, None, None, None)
    assert g0.memory_total_bytes == 80 * GiB
    assert g1.name is None
    assert g1.memory_total_bytes is None
    assert g1.memory_free_bytes is None
    assert g1.uuid is not None


def test_a_gpu_without_a_handle_keeps_its_row() -> None:
    nv = FakeNVML([FakeGpu(), FakeGpu()])
    nv.fail("nvmlDeviceGetHandleByIndex", NVMLError_GpuIsLost, index=0)
    gpu.set_backend(nv)
    g0, g1 = gpu.snapshot().gpus
    assert g0.index == 0
    assert g0.uuid is None
    assert g0.memory_total_bytes is None
    assert g1.index == 1
    assert g1.memory_total_bytes == 80 * GiB


def test_count_failing_is_a_reason_not_a_crash() -> None:
    nv = FakeNVML([FakeGpu()])
    nv.fail("nvmlDeviceGetCount", NVMLError_GpuIsLost)
    gpu.set_backend(nv)
    snap = gpu.snapshot()
    assert snap.gpus == []
    assert "cannot count" in (snap.error or "")


def test_processes_merge_compute_and_graphics() -> None:
    nv = FakeNVML([FakeGpu()], processes={0: [
        FakeProc(10, 4 * GiB),                   # compute only
        FakeProc(11, 1 * GiB, graphics=True),    # graphics only
        FakeProc(12, 2 * GiB, both=True),        # in both lists: counted once
        FakeProc(13, None),                      # MIG/WDDM: the driver does not say
    ]})
    gpu.set_backend(nv)
    procs = {p.pid: p for p in gpu.snapshot().processes}
    assert set(procs) == {10, 11, 12, 13}
    assert (procs[10].used_memory_bytes, procs[10].type) == (4 * GiB, "C")
    assert (procs[11].used_memory_bytes, procs[11].type) == (1 * GiB, "G")
    assert (procs[12].used_memory_bytes, procs[12].type) == (2 * GiB, "C+G")
    assert procs[13].used_memory_bytes is None
    assert all(p.gpu_uuid == "GPU-00000000-aaaa-bbbb-cccc-000000000000" for p in procs.values())


def test_process_list_failing_leaves_the_gpu() -> None:
    nv = two_gpus()
    nv.fail("nvmlDeviceGetComputeRunningProcesses", NVMLError_NoPermission)
    gpu.set_backend(nv)
    snap = gpu.snapshot()
    assert len(snap.gpus) == 2
    assert [p.pid for p in snap.processes] == [101]  # the graphics list still answered


@pytest.mark.parametrize(("spec", "want"), [
    ("0", [0]), ("1,0", [1, 0]), (" 0 , 1 ", [0, 1]),
    ("GPU-00000001-aaaa-bbbb-cccc-000000000001", [1]),
    ("gpu-00000001-AAAA-bbbb-cccc-000000000001", [1]),  # case-insensitive
    ("GPU-00000001", [1]),  # a unique prefix
    ("00000000-aaaa", [0]),  # a prefix without "GPU-"
    ("0,GPU-00000001", [0, 1]),
])
def test_parse_gpus(spec: str, want: list[int]) -> None:
    gpu.set_backend(two_gpus())
    assert [g.index for g in gpu.parse_gpus(spec, gpu.gpus())] == want


@pytest.mark.parametrize(("spec", "words"), [
    ("2", "no GPU 2 on this machine (GPUs: 0, 1)"),
    ("0,0", "listed twice"),
    ("0,GPU-00000000", "listed twice"),
    ("", "empty"),
    ("0,", "empty"),
    ("abc", "neither an index nor a GPU UUID"),
    ("GPU-0000000", "matches 2 GPUs"),
    ("GPU-ffffffff", "no GPU with UUID GPU-ffffffff"),
])
def test_parse_gpus_errors(spec: str, words: str) -> None:
    gpu.set_backend(two_gpus())
    with pytest.raises(UsageError) as exc:
        gpu.parse_gpus(spec, gpu.gpus())
    assert words in exc.value.message
    assert exc.value.exit_code == 2
    assert exc.value.hint


def test_cuda_visible_devices_by_uuid_else_pci_order() -> None:
    gpu.set_backend(two_gpus())
    g = gpu.gpus()
    assert gpu.cuda_visible_devices(g) == (f"{g[0].uuid},{g[1].uuid}", {})
    g[1].uuid = None
    assert gpu.cuda_visible_devices(g) == ("0,1", {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
