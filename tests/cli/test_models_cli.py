"""`sage llm models ...` and the cache preflight of `start`, through the real CLI entry (fake vLLM, fake hub)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sage_llm.core.errors import UsageError
from sage_llm.core.state import StateStore
from sage_llm.engine.scripts.hf_layout import layout
from sage_llm.models import hf_cache
from tests.fakes.fake_hub import FakeHub, Repo
from tests.support.ports import free_port

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048}


def cache_model(cache: Path, repo_id: str, config: dict, weights: int = 4096) -> Path:
    src = cache.parent / "src" / repo_id.replace("/", "__")
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes(b"\0" * weights)
    return layout(src, cache, repo_id)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cache_model(cache, "org/Tiny-Chat", LLAMA)
    cache_model(cache, "Qwen/Qwen2.5-7B-Instruct-AWQ", {**LLAMA, "quantization_config": {"quant_method": "awq"}},
                weights=10000)
    return cache


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    h = FakeHub(repos={"org/remote": Repo({"config.json": b"{}", "model.safetensors": b"w" * 5000,
                                           "model.bin": b"b" * 7000, "tokenizer.json": b"t" * 100})}).start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.stop()


def test_list_json_and_table(cli, hub_cache: Path) -> None:
    code, stdout, stderr = cli("models", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["cache_dir"] == str(hub_cache)
    by_id = {m["repo_id"]: m for m in doc["models"]}
    assert set(by_id) == {"org/Tiny-Chat", "Qwen/Qwen2.5-7B-Instruct-AWQ"}
    assert by_id["Qwen/Qwen2.5-7B-Instruct-AWQ"]["quantization"] == "awq"
    assert by_id["org/Tiny-Chat"]["context_length"] == 2048
    assert by_id["org/Tiny-Chat"]["complete"] is True
    listed = json.loads(cli("models", "list", "--json")[1])  # `models` alone is `models list`
    assert [m["repo_id"] for m in listed["models"]] == [m["repo_id"] for m in doc["models"]]
    code, stdout, stderr = cli("models")
    assert code == 0
    assert "Qwen/Qwen2.5-7B-Instruct-AWQ" in stdout
    assert "awq" in stdout
    assert "complete" in stdout
    assert "2 model(s)" in stderr


def test_list_empty_cache_is_not_an_error(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "missing"))
    code, stdout, stderr = cli("models", "--json")
    assert code == 0
    assert json.loads(stdout)["models"] == []
    code, stdout, stderr = cli("models")
    assert (code, stdout) == (0, "")
    assert "no models" in stderr


def test_served_model_is_shown_and_cannot_be_removed(cli, hub_cache: Path, fake_vllm, stop_all, tmp_path: Path
                                                     ) -> None:
    port = free_port()
    extra = tmp_path / "dl"
    cache_model(extra, "org/Other", LLAMA)
    code, _, stderr = cli("start", "org/Tiny-Chat", "--port", str(port), "--name", "tiny", "--download-dir",
                          str(extra))
    assert code == 0, stderr
    assert "model org/Tiny-Chat: cached (4.1 KiB in " + str(hub_cache) + ")" in stderr
    doc = json.loads(cli("models", "--json")[1])
    by_id = {m["repo_id"]: m for m in doc["models"]}
    assert [u["name"] for u in by_id["org/Tiny-Chat"]["served_by"]] == ["tiny"]
    assert by_id["org/Tiny-Chat"]["served_by"][0]["port"] == port
    assert by_id["Qwen/Qwen2.5-7B-Instruct-AWQ"]["served_by"] == []
    # the --download-dir the engine was started with is listed too
    assert by_id["org/Other"]["source"] == "download-dir"
    assert by_id["org/Other"]["cache_dir"] == str(extra)
    code, stdout, stderr = cli("models", "rm", "org/Tiny-Chat", "-y")
    assert code == 1
    assert "served by engine tiny" in stderr
    assert "sage-llm stop tiny" in stderr
    assert hf_cache.is_cached("org/Tiny-Chat")
    assert cli("stop", "tiny")[0] == 0
    code, stdout, stderr = cli("models", "rm", "org/Tiny-Chat", "-y", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["freed_bytes"] >= 4096
    assert not hf_cache.is_cached("org/Tiny-Chat")


def test_rm_without_terminal_needs_yes(cli, hub_cache: Path) -> None:
    code, stdout, stderr = cli("models", "rm", "org/Tiny-Chat")  # pytest's stdin is not a terminal
    assert code == 2
    assert "needs confirmation" in stderr
    assert "-y" in stderr
    assert hf_cache.is_cached("org/Tiny-Chat")
    code, stdout, stderr = cli("models", "rm", "org/Nothing", "-y")
    assert code == 2
    assert "not in the local cache" in stderr
    code, stdout, stderr = cli("models", "rm", "org/Tiny-Chat", "-y")
    assert code == 0
    assert "removed org/Tiny-Chat" in stdout
    assert "freed" in stdout


def test_start_offline_without_cached_copy_refuses_before_spawning(cli, hub_cache: Path, fake_vllm,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stdout, stderr = cli("start", "org/Not-Here", "--port", str(free_port()))
    assert code == 2
    assert "HF_HUB_OFFLINE" in stderr
    assert "sage-llm models pull org/Not-Here" in stderr
    assert StateStore().names() == []  # nothing recorded, nothing spawned
    assert stdout == ""


def test_start_says_it_will_download_and_how_much(cli, hub: FakeHub, fake_vllm, stop_all) -> None:
    code, _, stderr = cli("start", "org/remote", "--port", str(free_port()), "--no-wait")
    assert code == 0, stderr
    # safetensors weights (5000) + the small files (2 + 100); the .bin duplicate is not fetched by vLLM
    assert "model org/remote: not cached; vLLM will download it (about 5.0 KiB)" in stderr


def test_preflight_cases(hub_cache: Path, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pre = hf_cache.preflight("org/Tiny-Chat")
    assert pre.cached
    assert pre.size_bytes == 4096 + len(json.dumps(LLAMA))
    pre = hf_cache.preflight("org/remote")
    assert (pre.cached, pre.size_bytes, pre.size_error) == (False, 5102, None)
    assert hf_cache.preflight("org/unknown").size_error == "hub answered 404"
    assert not hf_cache.preflight(str(tmp_path)).is_repo_id
    other = tmp_path / "dl"
    cache_model(other, "org/Elsewhere", LLAMA)
    assert hf_cache.preflight("org/Elsewhere", download_dir=str(other)).cache_dir == str(other)
    part = hf_cache.repo_dir("org/partial") / "blobs"
    part.mkdir(parents=True)
    (part / "abc.incomplete").write_bytes(b"x")
    assert hf_cache.preflight("org/partial").partial
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as exc:
        hf_cache.preflight("org/remote")
    assert exc.value.exit_code == 2
    assert hf_cache.preflight("org/Tiny-Chat").cached  # offline is fine when it is cached


def test_recommend_no_gpu_and_with_gpus(cli) -> None:
    code, stdout, stderr = cli("models", "recommend", "--json")
    assert code == 0
    doc = json.loads(stdout)
    ids = [m["repo_id"] for m in doc["models"]]
    assert "Qwen/Qwen2.5-7B-Instruct" in ids
    assert "Qwen/Qwen2.5-1.5B-Instruct" in ids
    assert {m["fit"] for m in doc["models"]} == {"no GPU"}
    tags = {m["repo_id"]: m["tag"] for m in doc["models"]}
    assert tags["Qwen/Qwen2.5-7B-Instruct"] == "recommended"
    assert tags["Qwen/Qwen2.5-1.5B-Instruct"] == "low-VRAM"
    assert any(m["quantization"] == "awq" for m in doc["models"])
    code, stdout, _ = cli("models", "recommend")
    assert "no GPU" in stdout
    assert "Qwen/Qwen2.5-7B-Instruct (recommended)" in stdout


def test_recommend_fit_from_free_memory() -> None:
    from sage_llm.engine import catalog as models
    from sage_llm.observe.gpu import GpuInfo, Snapshot

    gib = 1024**3

    def gpu(i: int, free_gib: float) -> GpuInfo:
        return GpuInfo(index=i, uuid=f"GPU-{i}", name="Fake", memory_used_bytes=int(24 * gib - free_gib * gib),
                       memory_total_bytes=24 * gib, utilization_percent=0, temperature_c=None, power_draw_w=None,
                       power_limit_w=None)

    rows, err = models.recommend(Snapshot(gpus=[gpu(0, 20), gpu(1, 17)]))
    fit = {r["repo_id"]: r for r in rows}
    assert err is None
    assert fit["Qwen/Qwen2.5-7B-Instruct"]["fit"] == "fits"
    assert fit["Qwen/Qwen2.5-7B-Instruct"]["gpus_that_fit"] == [0]
    assert fit["Qwen/Qwen2.5-14B-Instruct"]["fit"] == "fits with -tp 2"  # 33 GiB over two GPUs of 17+ free
    assert fit["Qwen/Qwen2.5-32B-Instruct-AWQ"]["fit"] == "fits with -tp 2"
    rows, _ = models.recommend(Snapshot(gpus=[gpu(0, 4)]))
    fit = {r["repo_id"]: r["fit"] for r in rows}
    assert fit["Qwen/Qwen2.5-7B-Instruct"] == "too large"
    assert fit["Qwen/Qwen2.5-0.5B-Instruct"] == "fits"


def test_models_json_fast_path_imports_no_typer_nor_hub(hub_cache: Path) -> None:
    import subprocess
    import sys

    code = ("import json, sys; from sage_llm.cli.main import run; rc = run(['models', '--json']); "
            "heavy = [m for m in ('typer', 'rich', 'huggingface_hub', 'pydantic') if m in sys.modules]; "
            "sys.stderr.write(json.dumps({'rc': rc, 'heavy': heavy}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=60)
    info = json.loads(proc.stderr.strip().splitlines()[-1])
    assert info == {"rc": 0, "heavy": []}
    doc = json.loads(proc.stdout)
    assert {m["repo_id"] for m in doc["models"]} == {"org/Tiny-Chat", "Qwen/Qwen2.5-7B-Instruct-AWQ"}


def test_import_refuses_bad_input_before_any_work(cli, hub_cache: Path, tmp_path: Path) -> None:
    code, _, stderr = cli("models", "import", str(tmp_path / "none.gguf"), "--as", "me/x")
    assert code == 2
    assert "does not exist" in stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOTG" + b"\0" * 100)
    code, _, stderr = cli("models", "import", str(fake), "--as", "me/x")
    assert code == 2
    assert "not a GGUF file" in stderr
    real_magic = tmp_path / "m.gguf"
    real_magic.write_bytes(b"GGUF" + b"\0" * 100)
    code, _, stderr = cli("models", "import", str(real_magic), "--as", "no-slash")
    assert code == 2
    assert "ORG/NAME" in stderr
    code, _, stderr = cli("models", "import", str(real_magic), "--as", "org/Tiny-Chat")
    assert code == 2
    assert "already exists" in stderr
    assert "models rm org/Tiny-Chat" in stderr
    # no engine environment recorded in this test's state directory: the conversion has no Python to run with
    code, _, stderr = cli("models", "import", str(real_magic), "--as", "me/x")
    assert code == 1
    assert "no engine environment" in stderr
    assert "sage-llm engine install --gguf" in stderr
    assert not hf_cache.repo_dir("me/x").exists()


def test_pull_progress_without_terminal_is_a_line_every_5_s(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from sage_llm.cli.commands import models as cmd

    clock = [100.0]
    monkeypatch.setattr(cmd.time, "monotonic", lambda: clock[0])
    bar = cmd._Bar("pulling org/x")
    bar.tty = False
    for done, step in ((1024, 1.0), (2048, 1.0), (4096, 4.0), (8192, 1.0), (3 * 1024**2, 5.0)):
        clock[0] += step
        bar.update(done, 4 * 1024**2)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["pulling org/x: 4.0 KiB of 4.0 MiB (0%)",
                                         "pulling org/x: 3.0 MiB of 4.0 MiB (75%)"]
