"""The tiny-model helper: reuses a complete snapshot, builds otherwise, and reports a failed build."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sage_llm.core.errors import SageLLMError
from sage_llm.engine.scripts import hf_layout
from tests.support import tiny


def _fake_model(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"\0" * 16)
    return src


def test_existing_snapshot_is_reused_without_running_python(tmp_path: Path):
    cache = tmp_path / "hub"
    snap = hf_layout.layout(_fake_model(tmp_path), cache, tiny.TINY_REPO)
    assert tiny.snapshot(cache) == snap
    assert tiny.build_tiny_model(cache, tmp_path / "no-such-python") == snap


def test_incomplete_snapshot_is_not_taken_for_a_model(tmp_path: Path):
    src = _fake_model(tmp_path)
    (src / "tokenizer.json").unlink()
    cache = tmp_path / "hub"
    hf_layout.layout(src, cache, tiny.TINY_REPO)
    assert tiny.snapshot(cache) is None


def test_missing_python_says_to_install_the_engine(tmp_path: Path):
    with pytest.raises(SageLLMError, match="does not exist") as info:
        tiny.build_tiny_model(tmp_path / "hub", tmp_path / "no-such-python")
    assert "engine install" in (info.value.hint or "")


def test_a_failing_build_reports_its_output(tmp_path: Path):
    # sage_llm's own venv has no torch/tokenizers: the script runs and fails on its imports
    with pytest.raises(SageLLMError, match=r"building the tiny model failed \(exit 1\)") as info:
        tiny.build_tiny_model(tmp_path / "hub", sys.executable)
    assert "No module named" in info.value.message
    assert tiny.snapshot(tmp_path / "hub") is None
