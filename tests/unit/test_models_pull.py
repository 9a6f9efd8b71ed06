"""`models pull` against a local hub that speaks the hub's file protocol (HF_ENDPOINT=http://127.0.0.1:PORT)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sage_llm.engine import catalog as models
from sage_llm.models import hf_cache
from tests.fakes.fake_hub import FakeHub, Repo
from tests.support.ports import free_port

CONFIG = json.dumps({"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 4096,
                     "quantization_config": {"quant_method": "awq"}}).encode()
BIG = 11 * 1024 * 1024  # over huggingface_hub's 10 MiB read chunk, so a cut after 10.5 MiB has a chunk on disk


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    weights = os.urandom(300_000)
    h = FakeHub(repos={
        "org/tiny": Repo({"config.json": CONFIG, "model.safetensors": weights, "tokenizer.json": b"{}"}),
        "org/private": Repo({"config.json": CONFIG}),
        "org/big": Repo({"config.json": CONFIG, "model.safetensors": os.urandom(BIG)}),
    }, private={"org/private": "hf_secret"}, gated={"org/gated"}).start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield h
    h.stop()


def gets(hub: FakeHub, fname: str) -> list[dict[str, str]]:
    return [hdrs for method, path, hdrs in hub.requests if method == "GET" and path.endswith("/" + fname)]


def test_pull_lays_out_a_complete_cache_entry(hub: FakeHub) -> None:
    seen: list[tuple[int, int | None]] = []
    result = models.pull("org/tiny", on_bytes=lambda done, total: seen.append((done, total)))
    repo = hub.repos["org/tiny"]
    assert Path(result.snapshot_path).name == repo.commit
    assert result.nb_files == 3
    assert result.size_on_disk == sum(len(b) for b in repo.files.values())
    snap = Path(result.snapshot_path)
    assert (snap / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
    found = {m.repo_id: m for m in hf_cache.scan()}
    tiny = found["org/tiny"]
    assert tiny.complete
    assert tiny.quantization == "awq"
    assert tiny.context_length == 4096
    assert seen[-1] == (result.size_on_disk, result.size_on_disk)  # progress reached the total
    # a second pull downloads nothing
    before = len(gets(hub, "model.safetensors"))
    models.pull("org/tiny")
    assert len(gets(hub, "model.safetensors")) == before


def test_include_globs(hub: FakeHub) -> None:
    result = models.pull("org/tiny", include=["*.json"])
    assert sorted(os.listdir(result.snapshot_path)) == ["config.json", "tokenizer.json"]
    assert gets(hub, "model.safetensors") == []


def test_dropped_connection_resumes_with_a_range_request(hub: FakeHub) -> None:
    hub.cut_after["model.safetensors"] = BIG - 512 * 1024
    result = models.pull("org/big")
    data = hub.repos["org/big"].files["model.safetensors"]
    on_disk = (Path(result.snapshot_path) / "model.safetensors").read_bytes()
    assert hashlib.sha256(on_disk).digest() == hashlib.sha256(data).digest()
    ranges = [{k.lower(): v for k, v in h.items()}.get("range") for h in gets(hub, "model.safetensors")]
    assert ranges[0] is None
    assert ranges[1] == f"bytes={10 * 1024 * 1024}-"  # the second request continued after the chunk on disk


def test_interrupted_pull_then_rerun_completes_without_refetching(hub: FakeHub) -> None:
    hub.fail_get["model.safetensors"] = 500
    with pytest.raises(models.DownloadError) as exc:
        models.pull("org/tiny")
    assert "500" in exc.value.message
    assert "re-run" in (exc.value.hint or "")
    part = {m.repo_id: m for m in hf_cache.scan()}["org/tiny"]
    assert not part.complete  # what was fetched is there, the weights are not
    # a download killed with SIGKILL leaves its per-process partial file behind
    etag = hub.repos["org/tiny"].etag("model.safetensors")
    orphan = Path(part.repo_path) / "blobs" / f"{etag}.0badf00d.incomplete"
    orphan.write_bytes(b"\0" * 1234)
    assert {m.repo_id: m for m in hf_cache.scan()}["org/tiny"].incomplete_bytes == 1234
    del hub.fail_get["model.safetensors"]
    config_gets = len(gets(hub, "config.json"))
    result = models.pull("org/tiny")
    assert len(gets(hub, "config.json")) == config_gets  # files already complete are not fetched again
    assert not orphan.exists()
    tiny = {m.repo_id: m for m in hf_cache.scan()}["org/tiny"]
    assert tiny.complete
    assert tiny.incomplete_files == 0
    assert tiny.size_on_disk == result.size_on_disk


def test_401_without_token_then_token_opens_it(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(models.DownloadError) as exc:
        models.pull("org/private")
    assert "401" in exc.value.message
    assert "HF_TOKEN" in (exc.value.hint or "")
    assert "hf auth login" in (exc.value.hint or "")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert models.pull("org/private").nb_files == 1
    auth = [{k.lower(): v for k, v in h.items()}.get("authorization") for _, _, h in hub.requests]
    assert "Bearer hf_secret" in auth


def test_gated_not_found_bad_revision(hub: FakeHub) -> None:
    with pytest.raises(models.DownloadError, match="gated") as exc:
        models.pull("org/gated")
    assert "HF_TOKEN" in (exc.value.hint or "")
    with pytest.raises(models.DownloadError, match="not found") as exc:
        models.pull("org/missing")
    assert "404" in exc.value.message


def test_offline_and_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(models.DownloadError, match="cannot reach the hub") as exc:
        models.pull("org/tiny")
    assert "127.0.0.1" in exc.value.message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.DownloadError, match="HF_HUB_OFFLINE") as exc:
        models.pull("org/tiny")
    assert "unset HF_HUB_OFFLINE" in (exc.value.hint or "")


def test_cli_pull_json_and_errors(hub: FakeHub, cli) -> None:
    code, stdout, stderr = cli("models", "pull", "org/tiny", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["repo_id"] == "org/tiny"
    assert doc["nb_files"] == 3
    code, stdout, stderr = cli("models", "pull", "org/private")
    assert code == 1
    assert stdout == ""
    assert "Error: org/private: not authorised (401)" in stderr
    assert "hf auth login" in stderr
    code, _, stderr = cli("models", "pull", "not-a-repo-id")
    assert code == 2
    assert "ORG/NAME" in stderr


def test_pull_and_rm_are_audited(hub: FakeHub) -> None:
    from sage_llm.core import audit

    models.pull("org/tiny")
    with pytest.raises(models.DownloadError):
        models.pull("org/private")
    models.remove(models.plan_remove("org/tiny"))
    entries = [e for e in audit.read() if e["command"].startswith("model ")]
    assert [(e["command"], e["outcome"]) for e in entries] == [("model pull", "ok"), ("model pull", "error"),
                                                                ("model rm", "ok")]
    assert entries[0]["args"]["repo_id"] == "org/tiny"
    assert entries[0]["result"]["nb_files"] == 3
    assert "401" in entries[1]["error"]
    assert entries[2]["result"]["freed_bytes"] > 300_000
