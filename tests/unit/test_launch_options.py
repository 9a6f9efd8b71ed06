"""The launch options are declared once (engine/vllm.py LAUNCH_OPTIONS); the typed classes that carry them and the
CLI's options follow that table, and `vllm serve` gets exactly its flags."""

from __future__ import annotations

from sage_llm import api
from sage_llm.cli import _launch
from sage_llm.core.records import fields
from sage_llm.engine.vllm import LAUNCH_OPTION_NAMES, LAUNCH_OPTIONS, LaunchSpec, build_argv


def _names(cls: type) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


def test_the_typed_classes_declare_the_tables_options() -> None:
    assert [n for n in fields(LaunchSpec) if n not in ("model", "extra_args")] == list(LAUNCH_OPTION_NAMES)
    assert sorted(n for n in _names(api.LaunchOptions) if n != "extra_args") == sorted(LAUNCH_OPTION_NAMES)


def test_the_cli_offers_every_option_under_the_libraries_flag() -> None:
    assert sorted(_launch.LAUNCH_OPTION_NAMES) == sorted(LAUNCH_OPTION_NAMES)
    by_name = {o.name: o for o in _launch._TABLE}
    for opt in LAUNCH_OPTIONS:
        assert by_name[opt.name].decls[0] == opt.flag
        assert (by_name[opt.name].toggle is not None) == opt.switch


def test_vllm_gets_every_option_with_its_flag() -> None:
    spec = LaunchSpec(model="org/m", host="127.0.0.1", port=8001, gpu_memory_utilization=0.5, served_model_name="s",
                      quantization="awq", max_model_len="4096", tensor_parallel_size=2, pipeline_parallel_size=3,
                      data_parallel_size=4, dtype="half", enforce_eager=True, download_dir="/d",
                      trust_remote_code=True, api_key_env="K", ray_address="10.0.0.1:6379", extra_args=["--x"])
    assert build_argv(["vllm"], spec) == [
        "vllm", "serve", "org/m", "--host", "127.0.0.1", "--port", "8001", "--gpu-memory-utilization", "0.5",
        "--served-model-name", "s", "--quantization", "awq", "--max-model-len", "4096", "--tensor-parallel-size", "2",
        "--pipeline-parallel-size", "3", "--data-parallel-size", "4", "--dtype", "half", "--enforce-eager",
        "--download-dir", "/d", "--trust-remote-code", "--distributed-executor-backend", "ray", "--x"]
    bare = LaunchSpec(model="org/m", host="127.0.0.1", port=8001, gpu_memory_utilization=0.9)
    assert build_argv(["vllm"], bare) == ["vllm", "serve", "org/m", "--host", "127.0.0.1", "--port", "8001",
                                          "--gpu-memory-utilization", "0.9"]


def test_resolve_launch_carries_every_option_into_the_spec(monkeypatch) -> None:
    monkeypatch.setenv("KEYVAR", "secret")
    request = api.LaunchRequest(model="org/m", host="127.0.0.1", port=8123, gpu_memory_utilization=0.5,
                                served_model_name="s", quantization="awq", max_model_len="4096",
                                tensor_parallel_size=2, pipeline_parallel_size=3, data_parallel_size=4, dtype="half",
                                enforce_eager=True, download_dir="/d", trust_remote_code=True, api_key_env="KEYVAR",
                                ray_address="10.0.0.1:6379", extra_args=["--x"])
    spec = api.resolve_launch(request).spec
    for name in LAUNCH_OPTION_NAMES:
        assert getattr(spec, name) == getattr(request, name), name
    assert spec.extra_args == ["--x"]
