"""The launch command: only the options given, secrets never on the command line."""

from __future__ import annotations

import pytest

from sage_llm.core.errors import UsageError
from sage_llm.engine.vllm import LaunchSpec, build_argv, build_env, validate


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


# --- the compute dtype (issue 12: bf16 on some CPUs answers nonsense; CPU engines default to float32) -------------

def _dtypes(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--dtype"] + [
        a.split("=", 1)[1] for a in argv if a.startswith("--dtype=")]


def test_cpu_engine_gets_float32_when_the_user_chose_no_dtype():
    from sage_llm.engine.vllm import choose_dtype

    s = spec()
    choice = choose_dtype(s, cpu_engine=True)
    assert (choice.value, choice.source) == ("float32", "cpu-default")
    assert _dtypes(build_argv(["vllm"], s, choice)) == ["float32"]
    assert choice.line() == "dtype: float32 (CPU default; --dtype to change)"
    assert s.dtype is None  # the spec keeps the user's choice (none): a restart on a GPU engine must not inherit it


def test_gpu_engine_keeps_vllms_auto():
    from sage_llm.engine.vllm import choose_dtype

    choice = choose_dtype(spec(), cpu_engine=False)
    assert (choice.value, choice.source) == (None, "auto")
    assert _dtypes(build_argv(["vllm"], spec(), choice)) == []
    assert choice.line("bfloat16") == "dtype: bfloat16 (vLLM's auto) (the checkpoint's; --dtype to change)"


@pytest.mark.parametrize(("kw", "expected"), [
    ({"dtype": "bfloat16"}, ["bfloat16"]),
    ({"extra_args": ["--dtype", "bfloat16"]}, ["bfloat16"]),
    ({"extra_args": ["--seed", "1", "--dtype=half"]}, ["half"]),
    ({"dtype": "auto"}, ["auto"]),
])
def test_an_explicit_dtype_is_never_overridden_on_cpu(kw, expected):
    from sage_llm.engine.vllm import choose_dtype

    s = spec(**kw)
    choice = choose_dtype(s, cpu_engine=True)
    assert choice.source == "user"
    assert choice.value == expected[0]
    assert _dtypes(build_argv(["vllm"], s, choice)) == expected


def test_cpu_default_steps_back_for_quantized_models_and_weights_that_do_not_fit():
    from sage_llm.engine.vllm import choose_dtype

    assert choose_dtype(spec(quantization="awq"), cpu_engine=True).value is None
    assert choose_dtype(spec(), cpu_engine=True, quantized=True).value is None
    gib = 1024 ** 3
    big = choose_dtype(spec(), cpu_engine=True, fp32_weight_bytes=28 * gib, memory_available=24 * gib)
    assert (big.value, big.source) == (None, "auto")
    assert "28.0 GiB" in big.line()
    assert "--dtype float32" in big.line()
    fits = choose_dtype(spec(), cpu_engine=True, fp32_weight_bytes=gib, memory_available=24 * gib)
    assert fits.value == "float32"


def test_dtype_from_args_last_one_wins():
    from sage_llm.engine.vllm import dtype_from_args

    assert dtype_from_args(["--dtype", "half", "--dtype=float32"]) == "float32"
    assert dtype_from_args(["--kv-cache-dtype", "fp8"]) is None
    assert dtype_from_args(["--dtype"]) is None
