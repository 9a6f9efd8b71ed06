"""The launch command: only the options given, secrets never on the command line."""

from __future__ import annotations

import pytest

from sage_llm.engine.vllm import LaunchSpec, build_argv, build_env, validate
from sage_llm.errors import UsageError


def spec(**kw) -> LaunchSpec:
    base = {"model": "org/m", "host": "127.0.0.1", "port": 8001, "gpu_memory_utilization": 0.9}
    base.update(kw)
    return LaunchSpec(**base)


def test_minimal_argv():
    assert build_argv(["vllm"], spec()) == [
        "vllm", "serve", "org/m", "--host", "127.0.0.1", "--port", "8001", "--gpu-memory-utilization", "0.9"]


def test_options_and_passthrough():
    argv = build_argv(["python", "-m", "vllm.entrypoints.cli.main"], spec(
        quantization="awq", max_model_len="4096", served_model_name="qwen", tensor_parallel_size=2, dtype="half",
        enforce_eager=True, extra_args=["--enable-prefix-caching", "--seed", "1"]))
    assert argv[:4] == ["python", "-m", "vllm.entrypoints.cli.main", "serve"]
    for pair in (["--quantization", "awq"], ["--max-model-len", "4096"], ["--served-model-name", "qwen"],
                 ["--tensor-parallel-size", "2"], ["--dtype", "half"]):
        i = argv.index(pair[0])
        assert argv[i + 1] == pair[1]
    assert "--enforce-eager" in argv
    assert argv[-3:] == ["--enable-prefix-caching", "--seed", "1"]


def test_api_key_goes_to_env_never_argv(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    s = spec(api_key_env="MY_KEY")
    validate(s)
    argv = build_argv(["vllm"], s)
    env, added = build_env(s, "id1", cpu_engine=False, base={"MY_KEY": "sk-secret-123", "PATH": "/bin"})
    assert "sk-secret-123" not in " ".join(argv)
    assert env["VLLM_API_KEY"] == "sk-secret-123"
    assert "sk-secret-123" not in str(added)
    assert "sk-secret-123" not in str(s.settings())


def test_inherited_vllm_api_key_is_not_passed_silently():
    env, _ = build_env(spec(), "id1", cpu_engine=False, base={"VLLM_API_KEY": "leak", "PATH": "/bin"})
    assert "VLLM_API_KEY" not in env


def test_cpu_kvcache_default_and_user_override():
    env, added = build_env(spec(), "id", cpu_engine=True, base={})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert added["VLLM_CPU_KVCACHE_SPACE"] == "1"
    env, added = build_env(spec(), "id", cpu_engine=True, base={"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert "VLLM_CPU_KVCACHE_SPACE" not in added
    env, _ = build_env(spec(), "id", cpu_engine=False, base={})
    assert "VLLM_CPU_KVCACHE_SPACE" not in env


def test_engine_marker_and_offline_when_cached():
    env, added = build_env(spec(), "abc", cpu_engine=False, base={}, offline_ok=True)
    assert env["SAGE_LLM_ENGINE_ID"] == "abc"
    assert env["HF_HUB_OFFLINE"] == "1"
    env, _ = build_env(spec(), "abc", cpu_engine=False, base={"HF_HUB_OFFLINE": "0"}, offline_ok=True)
    assert env["HF_HUB_OFFLINE"] == "0"


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"port": 0}, "out of range"),
        ({"port": 70000}, "out of range"),
        ({"gpu_memory_utilization": 0.0}, "--gpu-memory-utilization"),
        ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization"),
        ({"quantization": "awqq"}, "unknown quantization"),
        ({"model": "/no/such/dir"}, "does not exist"),
        ({"model": "a/b/c"}, "neither an existing path nor a hub id"),
        ({"model": ""}, "MODEL is empty"),
        ({"max_model_len": "lots"}, "--max-model-len"),
        ({"dtype": "int3"}, "--dtype"),
        ({"tensor_parallel_size": 0}, "--tensor-parallel-size"),
        ({"api_key_env": "NOT SET"}, "not a variable name"),
        ({"api_key_env": "SAGE_TEST_UNSET_KEY"}, "not set"),
        ({"extra_args": ["--api-key", "x"]}, "secret on the command line"),
        ({"extra_args": ["--hf-token=x"]}, "secret on the command line"),
    ],
)
def test_validation(kw, fragment):
    with pytest.raises(UsageError, match=fragment.replace("-", r"\-")) as exc:
        validate(spec(**kw))
    assert exc.value.exit_code == 2
    assert exc.value.hint
