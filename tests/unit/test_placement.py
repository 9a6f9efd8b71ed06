"""GPU placement and the pre-flight memory check (engine/placement.py), on a fake NVML."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sage_llm.core.errors import UsageError
from sage_llm.core.state import EngineRecord
from sage_llm.engine import placement
from sage_llm.engine.placement import InsufficientGpuMemory, plan
from sage_llm.engine.vllm import LaunchSpec
from sage_llm.observe import gpu

try:
    from tests.fakes.fake_nvml import FakeGpu, FakeNVML, FakeProc, GiB
except ModuleNotFoundError:  # tests/ not a package: its conftest put tests/ itself on sys.path
    from fakes.fake_nvml import FakeGpu, FakeNVML, FakeProc, GiB


def machine(*used_gib: float, procs: dict[int, list[FakeProc]] | None = None) -> FakeNVML:
    nv = FakeNVML([FakeGpu(total=80 * GiB, used=int(u * GiB)) for u in used_gib], processes=procs or {})
    gpu.set_backend(nv)
    return nv


def engine(name: str, pids: list[int], gpus: list[dict] | None = None, util: float = 0.9):
    rec = EngineRecord(name=name, model="m/x", served_model_name="m/x", host="127.0.0.1", port=8001, pid=pids[0],
                       settings={"gpu_memory_utilization": util}, gpus=gpus or [])
    tree = SimpleNamespace(members=[SimpleNamespace(pid=p) for p in pids])
    return rec, tree


def test_auto_picks_the_gpus_with_most_free_memory() -> None:
    machine(70, 2, 40, 1)
    p = plan(needed=2, utilization=0.5)
    assert [g.index for g in p.gpus] == [1, 3]
    assert p.how == "auto"
    uuids = [g.uuid for g in p.gpus]
    assert p.env == {"CUDA_VISIBLE_DEVICES": ",".join(uuids)}
    rec = p.record()
    assert [(r["index"], r["uuid"], r["chosen_by"]) for r in rec] == [(1, uuids[0], "auto"), (3, uuids[1], "auto")]
    assert "most free memory" in p.notes[0]


def test_ties_go_to_the_lowest_index() -> None:
    machine(0, 0, 0)
    assert [g.index for g in plan(needed=1, utilization=0.9).gpus] == [0]


def test_explicit_gpus_by_index_and_uuid() -> None:
    nv = machine(0, 0, 0)
    assert [g.index for g in plan(needed=1, utilization=0.9, gpus_arg="2").gpus] == [2]
    p = plan(needed=2, utilization=0.9, gpus_arg=f"{nv.devices[1].uuid},0")
    assert [g.index for g in p.gpus] == [1, 0]
    assert p.how == "--gpus"
    assert p.env["CUDA_VISIBLE_DEVICES"] == f"{nv.devices[1].uuid},{nv.devices[0].uuid}"


def test_refuses_when_free_memory_is_short_and_names_the_engine_holding_it() -> None:
    machine(30, procs={0: [FakeProc(501, 20 * GiB), FakeProc(502, 9 * GiB), FakeProc(777, 1 * GiB)]})
    live = [engine("qwen-7b", [500, 501, 502])]
    with pytest.raises(InsufficientGpuMemory) as exc:
        plan(needed=1, utilization=0.9, live=live)
    msg = exc.value.message
    assert "\n" not in msg
    assert msg.startswith("GPU 0 has 50.0 GiB free of 80.0 GiB, but --gpu-memory-utilization 0.9 needs 72.0 GiB")
    assert "held by engine 'qwen-7b' (29.0 GiB), pid 777 (1.0 GiB)" in msg
    assert exc.value.exit_code == 1
    assert "--gpu-memory-utilization to 0.62" in exc.value.hint
    assert "--skip-checks" in exc.value.hint


def test_skip_checks_overrides_the_memory_check() -> None:
    machine(79)
    p = plan(needed=1, utilization=0.9, skip_checks=True)
    assert [g.index for g in p.gpus] == [0]


def test_a_smaller_utilisation_fits() -> None:
    machine(30)
    assert [g.index for g in plan(needed=1, utilization=0.6).gpus] == [0]


def test_memory_claimed_by_an_engine_still_starting_counts_as_taken() -> None:
    nv = machine(1, 0)
    starting = engine("first", [900], gpus=[{"index": 0, "uuid": nv.devices[0].uuid}], util=0.5)
    # GPU 0 shows 79 GiB free, but 'first' will take 40 GiB of it: the next engine goes to GPU 1
    p = plan(needed=1, utilization=0.5, live=[starting])
    assert [g.index for g in p.gpus] == [1]
    with pytest.raises(InsufficientGpuMemory, match="claimed by engines still starting"):
        plan(needed=1, utilization=0.6, gpus_arg="0", live=[starting])


def test_an_engine_that_already_allocated_claims_nothing_more() -> None:
    nv = machine(36, procs={0: [FakeProc(901, 36 * GiB)]})
    loaded = engine("first", [900, 901], gpus=[{"index": 0, "uuid": nv.devices[0].uuid}], util=0.45)
    assert [g.index for g in plan(needed=1, utilization=0.5, live=[loaded]).gpus] == [0]


def test_too_few_gpus() -> None:
    machine(0)
    with pytest.raises(UsageError, match=r"needs 2 GPUs .* only 1 is visible"):
        plan(needed=2, utilization=0.9)
    with pytest.raises(UsageError, match="names 1 GPU"):
        plan(needed=2, utilization=0.9, gpus_arg="0")
    assert len(plan(needed=2, utilization=0.9, skip_checks=True).gpus) == 1


def test_no_gpu_is_a_no_op_unless_gpus_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "DRIVER_MARKERS", ("/nonexistent",))
    gpu.reset()
    p = plan(needed=1, utilization=0.9)
    assert (p.gpus, p.env, p.record()) == ([], {}, [])
    with pytest.raises(UsageError) as exc:
        plan(needed=1, utilization=0.9, gpus_arg="0")
    assert "no GPU is usable here: no NVIDIA driver found" in exc.value.message


def test_cpu_engine_skips_placement_and_rejects_gpus() -> None:
    nv = machine(0)
    assert plan(needed=1, utilization=0.9, cpu_engine=True).gpus == []
    assert nv.calls["nvmlDeviceGetCount"] == 0  # not even asked
    with pytest.raises(UsageError, match="CPU build"):
        plan(needed=1, utilization=0.9, gpus_arg="0", cpu_engine=True)


def test_ray_cluster_engines_need_no_local_gpu() -> None:
    machine(79)
    assert plan(needed=0, utilization=0.9).gpus == []


def test_inherited_cuda_visible_devices_limits_the_choice() -> None:
    nv = machine(0, 50, 0)
    p = plan(needed=1, utilization=0.3, environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert [g.index for g in p.gpus] == [1]
    assert p.how == "environment"
    p = plan(needed=1, utilization=0.3, environ={"CUDA_VISIBLE_DEVICES": "MIG-1234abcd-0000"})
    assert p.gpus == []
    assert p.env == {}
    assert "as set" in p.notes[0]
    assert nv.devices


def test_apply_sets_the_engine_environment() -> None:
    nv = machine(0, 0)
    spec = LaunchSpec(model="m/x", host="127.0.0.1", port=8001, gpu_memory_utilization=0.9, tensor_parallel_size=2)
    env: dict[str, str] = {"PATH": "/bin"}
    added: dict[str, str] = {}
    p = placement.apply(spec, env, added, None, False, [], cpu_engine=False)
    want = f"{nv.devices[0].uuid},{nv.devices[1].uuid}"
    assert env["CUDA_VISIBLE_DEVICES"] == added["CUDA_VISIBLE_DEVICES"] == want
    assert len(p.gpus) == 2


def test_a_ready_engine_claims_nothing_beyond_what_it_holds() -> None:
    """A ready engine has allocated all it will (here 20 GiB of its 0.45 share): the rest of its share is free for the
    next start. Before readiness was in the record, its unused 16 GiB counted as claimed and a start that fits was
    refused."""
    nv = machine(20, procs={0: [FakeProc(901, 20 * GiB)]})
    rec, tree = engine("first", [900, 901], gpus=[{"index": 0, "uuid": nv.devices[0].uuid}], util=0.45)
    with pytest.raises(InsufficientGpuMemory, match="claimed by engines still starting"):
        plan(needed=1, utilization=0.7, live=[(rec, tree)])  # still starting: its 36 GiB share is spoken for
    rec.ready_at = "2026-12-06T18:00:00Z"
    assert [g.index for g in plan(needed=1, utilization=0.7, live=[(rec, tree)]).gpus] == [0]
