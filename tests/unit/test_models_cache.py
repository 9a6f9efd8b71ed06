"""The stdlib cache scanner behind `models list`, checked against huggingface_hub.scan_cache_dir on real layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sage_llm.engine import catalog as models
from sage_llm.engine.scripts.hf_layout import layout
from sage_llm.models import hf_cache


def make_model(tmp: Path, name: str, config: dict | None, weights: bytes = b"\0" * 4096,
               extra: dict[str, bytes] | None = None) -> Path:
    src = tmp / "src" / name.replace("/", "__")
    src.mkdir(parents=True)
    if config is not None:
        (src / "config.json").write_text(json.dumps(config))
    if weights:
        (src / "model.safetensors").write_bytes(weights)
    for fname, data in (extra or {}).items():
        (src / fname).write_bytes(data)
    return src


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A hub cache with: a plain model, an AWQ model, a GPTQ model (quant in text_config), a model with two
    revisions (main and refs/pr/1), an incomplete download, a repo with no weights, a dataset, and junk entries."""
    hub = tmp_path / "hub"
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048,
             "torch_dtype": "bfloat16"}
    layout(make_model(tmp_path, "t/tiny", llama, extra={"tokenizer.json": b"{}"}), hub, "sage-test/tiny-chat")
    awq = {"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768,
           "quantization_config": {"quant_method": "awq", "bits": 4}}
    layout(make_model(tmp_path, "q/awq", awq, weights=b"\1" * 10000), hub, "Qwen/Qwen2.5-7B-Instruct-AWQ")
    gptq = {"architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": {"max_position_embeddings": 131072, "quantization_config": {"quant_method": "gptq"}}}
    layout(make_model(tmp_path, "g/gptq", gptq), hub, "google/gemma-gptq")
    # two revisions: the second layout moves refs/main; keep the first as refs/pr/1
    first = layout(make_model(tmp_path, "m/v1", llama, weights=b"\2" * 3000), hub, "org/multi")
    layout(make_model(tmp_path, "m/v2", llama, weights=b"\3" * 5000), hub, "org/multi")
    pr = hub / "models--org--multi" / "refs" / "pr"
    pr.mkdir()
    (pr / "1").write_text(first.name)
    # an interrupted download: config present, weights still a .incomplete blob
    part = layout(make_model(tmp_path, "p/part", llama, weights=b""), hub, "org/partial")
    (part.parent.parent / "blobs" / ("a" * 64 + ".incomplete")).write_bytes(b"x" * 777)
    layout(make_model(tmp_path, "n/noweights", llama, weights=b""), hub, "org/no-weights")
    layout(make_model(tmp_path, "d/data", None, extra={"data.csv": b"a,b\n"}), hub, "org/ds")
    os.rename(hub / "models--org--ds", hub / "datasets--org--ds")
    (hub / ".locks").mkdir()
    (hub / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    return hub


def by_id(found: list[hf_cache.LocalModel]) -> dict[str, hf_cache.LocalModel]:
    return {m.repo_id: m for m in found}


def test_scan_matches_huggingface_hub(cache: Path) -> None:
    from huggingface_hub import scan_cache_dir

    ours = by_id(hf_cache.scan(cache))
    theirs = {r.repo_id: r for r in scan_cache_dir(cache).repos if r.repo_type == "model"}
    assert set(ours) == set(theirs) == {"sage-test/tiny-chat", "Qwen/Qwen2.5-7B-Instruct-AWQ", "google/gemma-gptq",
                                        "org/multi", "org/partial", "org/no-weights"}
    for rid, ref in theirs.items():
        m = ours[rid]
        assert m.size_on_disk == ref.size_on_disk, rid
        assert m.nb_files == ref.nb_files, rid
        assert m.last_accessed == pytest.approx(ref.last_accessed)
        assert m.last_modified == pytest.approx(ref.last_modified)
        assert {(r.commit_hash, r.size_on_disk, r.nb_files, tuple(sorted(r.refs))) for r in m.revisions} == \
            {(r.commit_hash, r.size_on_disk, r.nb_files, tuple(sorted(r.refs))) for r in ref.revisions}, rid


def test_metadata_from_config(cache: Path) -> None:
    found = by_id(hf_cache.scan(cache))
    tiny = found["sage-test/tiny-chat"]
    assert (tiny.architecture, tiny.model_type, tiny.context_length, tiny.quantization, tiny.torch_dtype) == \
        ("LlamaForCausalLM", "llama", 2048, None, "bfloat16")
    assert tiny.complete
    assert not tiny.incomplete
    assert found["Qwen/Qwen2.5-7B-Instruct-AWQ"].quantization == "awq"
    gemma = found["google/gemma-gptq"]
    assert (gemma.quantization, gemma.context_length) == ("gptq", 131072)


def test_two_revisions_and_refs(cache: Path) -> None:
    multi = by_id(hf_cache.scan(cache))["org/multi"]
    assert len(multi.revisions) == 2
    assert sorted(r for rev in multi.revisions for r in rev.refs) == ["main", "pr/1"]
    main = next(r for r in multi.revisions if "main" in r.refs)
    assert multi.main_snapshot == main.snapshot_path
    assert os.path.getsize(Path(main.snapshot_path) / "model.safetensors") == 5000
    # config.json is byte-identical in both revisions: one blob, counted once
    assert multi.nb_files == 3
    assert multi.size_on_disk == 3000 + 5000 + len(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                               "model_type": "llama", "max_position_embeddings": 2048,
                                                               "torch_dtype": "bfloat16"}))


def test_incomplete_download_and_missing_weights(cache: Path) -> None:
    found = by_id(hf_cache.scan(cache))
    part = found["org/partial"]
    assert (part.incomplete_files, part.incomplete_bytes, part.complete, part.incomplete) == (1, 777, False, True)
    assert part.to_json()["incomplete"] is True
    noweights = found["org/no-weights"]
    assert not noweights.complete
    assert noweights.incomplete_files == 0
    assert noweights.incomplete
    assert not hf_cache.is_cached("org/partial", cache)
    assert hf_cache.is_cached("sage-test/tiny-chat", cache)


def test_missing_cache_is_no_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hf_cache.scan(tmp_path / "nope") == []
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nope"))
    found, warnings = models.local_models()
    assert (found, warnings) == ([], [])


def test_honours_hf_home(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    home = tmp_path / "hfhome"
    home.mkdir()
    os.rename(cache, home / "hub")
    monkeypatch.setenv("HF_HOME", str(home))
    assert "org/multi" in {m.repo_id for m in models.local_models()[0]}


def test_corrupt_repo_is_reported_not_fatal(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = hf_cache.snapshot_path("sage-test/tiny-chat", cache=cache)
    assert snap is not None
    target = os.readlink(snap / "model.safetensors")
    os.unlink(snap.parent.parent / "blobs" / os.path.basename(target))  # a snapshot link to a missing blob
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    found, warnings = models.local_models()
    tiny = by_id(found)["sage-test/tiny-chat"]
    assert tiny.error
    assert "broken symlink" in tiny.error
    assert not tiny.complete
    assert any("sage-test/tiny-chat" in w for w in warnings)


def test_json_shape(cache: Path) -> None:
    doc = by_id(hf_cache.scan(cache))["sage-test/tiny-chat"].to_json()
    assert doc["last_accessed"].endswith("Z")
    assert isinstance(doc["size_on_disk"], int)
    assert doc["revisions"][0]["refs"] == ["main"]
    assert doc["served_by"] == []
    json.dumps(doc)


def test_read_config_variants(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 1024, "quantization_config":
                                                      {"load_in_4bit": True}, "architectures": "bad"}))
    cfg = hf_cache.read_config(tmp_path)
    assert (cfg["context_length"], cfg["quantization"], cfg["architecture"]) == (1024, "bitsandbytes", None)
    (tmp_path / "config.json").write_text("{not json")
    assert hf_cache.read_config(tmp_path) == {}
    assert hf_cache.read_config(tmp_path / "missing") == {}


def test_remove_frees_space_and_leaves_the_rest(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    plan = models.plan_remove("org/multi")
    assert plan.freed_bytes == by_id(hf_cache.scan(cache))["org/multi"].size_on_disk
    freed = models.remove(plan)
    assert freed >= plan.freed_bytes
    assert not (cache / "models--org--multi").exists()
    assert "org/multi" not in by_id(hf_cache.scan(cache))
    assert "sage-test/tiny-chat" in by_id(hf_cache.scan(cache))
    # a repo holding nothing but a partial download goes too
    models.remove(models.plan_remove("org/partial"))
    assert not (cache / "models--org--partial").exists()


def test_remove_unknown_and_bad_ids(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(models.ModelNotFound) as exc:
        models.plan_remove("org/never")
    assert exc.value.exit_code == 2
    for bad in ("noslash", "a/b/c", "../x", "a /b"):
        with pytest.raises(models.UsageError):
            models.plan_remove(bad)


def test_leftover_partial_of_a_finished_blob_does_not_make_it_incomplete(cache: Path) -> None:
    snap = hf_cache.snapshot_path("sage-test/tiny-chat", cache=cache)
    assert snap is not None
    blob = os.path.basename(os.readlink(snap / "model.safetensors"))
    (snap.parent.parent / "blobs" / f"{blob}.1a2b3c4d.incomplete").write_bytes(b"\0" * 10)
    assert hf_cache.is_cached("sage-test/tiny-chat", cache)
    tiny = by_id(hf_cache.scan(cache))["sage-test/tiny-chat"]
    assert tiny.complete
    assert tiny.incomplete_files == 0


def test_local_weights_for_the_cpu_dtype_default(cache: Path, tmp_path: Path) -> None:
    """(quantized, float32 bytes) that the CPU dtype default weighs: bf16 weights double, quantized ones are flagged,
    a model that is not local is unknown."""
    assert hf_cache.local_weights("sage-test/tiny-chat", download_dir=None) == (False, None)  # HF_HUB_CACHE elsewhere
    assert hf_cache.local_weights("sage-test/tiny-chat", download_dir=str(cache)) == (False, 2 * 4096)
    assert hf_cache.local_weights("Qwen/Qwen2.5-7B-Instruct-AWQ", download_dir=str(cache)) == (True, None)
    assert hf_cache.local_weights("org/absent", download_dir=str(cache)) == (False, None)
    fp32_dir = make_model(tmp_path, "p/fp32", {"torch_dtype": "float32"}, weights=b"\0" * 1000,
                          extra={"pytorch_model.bin": b"\0" * 1000})  # both formats: the safetensors count
    assert hf_cache.local_weights(str(fp32_dir)) == (False, 1000)
