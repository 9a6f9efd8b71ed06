"""Parallel and Ray launch options: argv, environment, validation, and the Ray diagnosis."""

from __future__ import annotations

import pytest

from sage_llm.core.errors import UsageError
from sage_llm.engine.vllm import (
    LaunchSpec,
    build_argv,
    build_env,
    cpu_bind_for,
    gpus_needed,
    ray_address_is_loopback,
    validate,
)
from sage_llm.observe.diagnose import diagnose


def spec(**kw) -> LaunchSpec:
    base = {"model": "org/model", "host": "127.0.0.1", "port": 19601, "gpu_memory_utilization": 0.9}
    base.update(kw)
    return LaunchSpec(**base)


def test_parallel_sizes_reach_argv_and_gpu_count():
    s = spec(tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2)
    argv = build_argv(["vllm"], s)
    for flag, value in (("--tensor-parallel-size", "2"), ("--pipeline-parallel-size", "2"),
                        ("--data-parallel-size", "2")):
        assert argv[argv.index(flag) + 1] == value
    assert gpus_needed(s) == 8
    assert gpus_needed(spec()) == 1
    assert gpus_needed(spec(tensor_parallel_size=4, ray_address="10.0.0.5:6379")) == 0  # ranks live on the cluster


@pytest.mark.parametrize(("ranks", "cores", "expected"), [
    (2, [0, 1], "0|1"),
    (2, [0, 1, 2, 3, 4, 5, 6, 7], "0-3|4-7"),
    (2, [0, 2, 4, 6], "0,2|4,6"),
    (3, [0, 1], "nobind"),  # fewer cores than ranks: let every worker use them all
    (1, [0, 1], "nobind"),
])
def test_cpu_bind_splits_cores_between_ranks(ranks, cores, expected):
    assert cpu_bind_for(ranks, cores) == expected


def test_cpu_tp_sets_thread_binding_only_when_the_user_did_not():
    env, added = build_env(spec(tensor_parallel_size=2), "id1", cpu_engine=True, base={})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == added["VLLM_CPU_OMP_THREADS_BIND"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] in (cpu_bind_for(2), "nobind")
    env, added = build_env(spec(tensor_parallel_size=2), "id1", cpu_engine=True,
                           base={"VLLM_CPU_OMP_THREADS_BIND": "0-1|0-1"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|0-1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in added
    env, _ = build_env(spec(tensor_parallel_size=2), "id1", cpu_engine=True, base={"VLLM_CPU_SIM_MULTI_NUMA": "1"})
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env
    env, _ = build_env(spec(tensor_parallel_size=2), "id1", cpu_engine=False, base={})  # GPU engine: not ours to set
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env
    env, _ = build_env(spec(), "id1", cpu_engine=True, base={})
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_ray_address_sets_backend_and_environment():
    s = spec(ray_address="127.0.0.1:19690")
    argv = build_argv(["vllm"], s)
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    env, added = build_env(s, "id1", cpu_engine=False, base={})
    assert env["RAY_ADDRESS"] == added["RAY_ADDRESS"] == "127.0.0.1:19690"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # loopback cluster: keep Ray on 127.0.0.1
    env, _ = build_env(spec(ray_address="10.0.0.5:6379"), "id1", cpu_engine=False, base={})
    assert env["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env
    # the user's own backend flag after `--` wins
    argv = build_argv(["vllm"], spec(ray_address="auto", extra_args=["--distributed-executor-backend=mp"]))
    assert argv.count("--distributed-executor-backend") == 0
    assert "--distributed-executor-backend=mp" in argv
    assert "RAY_ADDRESS" not in build_env(spec(), "id1", cpu_engine=False, base={})[0]


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "ray://head.local:10001", "auto", "[::1]:6379", "head:6379"])
def test_valid_ray_addresses(address):
    validate(spec(ray_address=address))


@pytest.mark.parametrize("address", ["", "127.0.0.1", "http://x:1", "a b:1", "local"])
def test_invalid_ray_addresses_are_usage_errors(address):
    with pytest.raises(UsageError, match="Ray cluster address"):
        validate(spec(ray_address=address))


def test_loopback_detection():
    assert ray_address_is_loopback("127.0.0.1:6379")
    assert ray_address_is_loopback("ray://localhost:10001")
    assert ray_address_is_loopback("[::1]:6379")
    assert not ray_address_is_loopback("10.1.2.3:6379")
    assert not ray_address_is_loopback("auto")


def test_data_parallel_size_is_validated():
    with pytest.raises(UsageError, match="--data-parallel-size 0"):
        validate(spec(data_parallel_size=0))


def test_cpu_ray_error_is_diagnosed():
    lines = [
        "(APIServer pid=1) INFO ray_utils.py:400] Connecting to existing Ray cluster at address: 127.0.0.1:19690.",
        "Traceback (most recent call last):",
        "ValueError: current platform cpu does not support ray.",
    ]
    d = diagnose(lines, {"port": 19601})
    assert d is not None
    assert d.cause == "ray_unsupported_platform"
    assert "GPU nodes" in d.message
    assert "--ray-address" in (d.hint or "")


def test_ray_address_needs_ray_in_the_engine_environment(tmp_path):
    from sage_llm.engine import manager
    from sage_llm.engine.envs import VllmCommand

    env = tmp_path / "venv"
    site = env / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    cmd = VllmCommand([str(env / "bin" / "vllm")], "engine-env", "cpu", str(env))
    manager._check_scaleout(spec(), cmd)  # no Ray asked for: nothing to check
    with pytest.raises(UsageError, match="needs Ray in the engine environment") as info:
        manager._check_scaleout(spec(ray_address="127.0.0.1:6379"), cmd)
    assert "engine install --ray" in (info.value.hint or "")
    (site / "ray").mkdir()
    (site / "ray" / "__init__.py").write_text("")
    manager._check_scaleout(spec(ray_address="127.0.0.1:6379"), cmd)
    # SAGE_LLM_VLLM (no known environment): vLLM itself says when Ray is missing
    manager._check_scaleout(spec(ray_address="127.0.0.1:6379"), VllmCommand(["vllm"], "SAGE_LLM_VLLM", None))
