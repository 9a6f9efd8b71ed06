"""`models import` around the conversion: staging, the move into the cache, --force, failures, an engine serving it.

The conversion itself (transformers dequantizing a real GGUF) runs in tests/integration/test_models_import.py; here a
stand-in for the engine's Python speaks the script's protocol (STEP lines, a RESULT line) and lays out a small
checkpoint with the real layout writer, so the flow is tested in milliseconds.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from sage_llm.engine import catalog as models
from sage_llm.models import hf_cache

CONVERTER = f"""#!{sys.executable}
import json, os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "src")!r})
from sage_llm.engine.scripts.hf_layout import layout
script, gguf, cache, repo_id = sys.argv[1:5]
if os.environ.get("FAKE_CONVERT_FAIL"):
    print("Traceback (most recent call last):")
    print("ValueError: GGUF model with architecture fancy is not supported yet.")
    sys.exit(1)
print("STEP loading and dequantizing weights from " + os.path.basename(gguf), flush=True)
work = os.path.join(cache, "scratch")
os.makedirs(work)
open(os.path.join(work, "config.json"), "w").write(json.dumps({{"architectures": ["LlamaForCausalLM"],
                                                               "max_position_embeddings": 8192}}))
open(os.path.join(work, "model.safetensors"), "wb").write(open(gguf, "rb").read()[4:] * 3)
snap = layout(work, cache, repo_id, move=True)
print("RESULT " + json.dumps({{"snapshot": str(snap), "size": 3 * (os.path.getsize(gguf) - 4) + 60}}))
"""


@pytest.fixture
def converter(tmp_path: Path) -> str:
    path = tmp_path / "engine-python"
    path.write_text(CONVERTER)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def gguf(tmp_path: Path, payload: bytes) -> Path:
    p = tmp_path / "model.Q4_K_M.gguf"
    p.write_bytes(b"GGUF" + payload)
    return p


def test_import_moves_a_complete_entry_into_the_cache(tmp_path: Path, converter: str) -> None:
    steps: list[str] = []
    result = models.import_gguf(gguf(tmp_path, b"a" * 1000), "me/model", python=converter, progress=steps.append)
    cache = hf_cache.hub_cache_dir()
    assert Path(result.snapshot_path).parent.parent == cache / "models--me--model"
    assert (Path(result.snapshot_path) / "model.safetensors").read_bytes() == b"a" * 3000
    assert any("dequantizing" in s for s in steps)
    assert sorted(os.listdir(cache)) == ["models--me--model"]  # no staging directory left
    found = {m.repo_id: m for m in hf_cache.scan()}
    assert found["me/model"].complete
    assert found["me/model"].context_length == 8192


def test_force_replaces_the_old_model_whole(tmp_path: Path, converter: str) -> None:
    models.import_gguf(gguf(tmp_path, b"a" * 1000), "me/model", python=converter)
    with pytest.raises(models.UsageError, match="already exists"):
        models.import_gguf(gguf(tmp_path, b"b" * 500), "me/model", python=converter)
    result = models.import_gguf(gguf(tmp_path, b"b" * 500), "me/model", python=converter, force=True)
    entry = {m.repo_id: m for m in hf_cache.scan()}["me/model"]
    assert len(entry.revisions) == 1  # the old revision went with the old model
    assert entry.size_on_disk == 1500 + len(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                         "max_position_embeddings": 8192}))
    assert (Path(result.snapshot_path) / "model.safetensors").read_bytes() == b"b" * 1500


def test_failed_conversion_leaves_nothing_and_keeps_the_old_model(tmp_path: Path, converter: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = models.import_gguf(gguf(tmp_path, b"a" * 1000), "me/model", python=converter)
    monkeypatch.setenv("FAKE_CONVERT_FAIL", "1")
    with pytest.raises(models.SageLLMError) as exc:
        models.import_gguf(gguf(tmp_path, b"b" * 500), "me/model", python=converter, force=True)
    assert "GGUF conversion failed (exit 1): ValueError: GGUF model with architecture fancy" in exc.value.message
    assert sorted(os.listdir(hf_cache.hub_cache_dir())) == ["models--me--model"]
    assert (Path(first.snapshot_path) / "model.safetensors").read_bytes() == b"a" * 3000
    with pytest.raises(models.SageLLMError):
        models.import_gguf(gguf(tmp_path, b"c"), "me/other", python=converter)
    assert not hf_cache.repo_dir("me/other").exists()


def test_force_refuses_while_an_engine_serves_it(tmp_path: Path, converter: str, cli, fake_vllm, stop_all) -> None:
    from tests.support.ports import free_port

    models.import_gguf(gguf(tmp_path, b"a" * 1000), "me/model", python=converter)
    code, _, stderr = cli("start", "me/model", "--name", "mine", "--port", str(free_port()))
    assert code == 0, stderr
    with pytest.raises(models.ModelInUse) as exc:
        models.import_gguf(gguf(tmp_path, b"b" * 500), "me/model", python=converter, force=True)
    assert "sage-llm stop mine" in (exc.value.hint or "")
    assert {m.repo_id: m for m in hf_cache.scan()}["me/model"].size_on_disk > 3000
