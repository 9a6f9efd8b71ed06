"""`start --ray-address` with the fake vLLM: what reaches the engine, what status shows, and that stop is bounded
when the cluster cannot be read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sage_llm.core.state import EngineRecord, StateStore
from sage_llm.engine import ray_cluster
from tests.support.ports import free_port

pytestmark = pytest.mark.usefixtures("fake_vllm", "stop_all")


def test_ray_address_reaches_the_engine_and_status(cli, monkeypatch):
    ray = f"127.0.0.1:{free_port()}"  # reserved: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", ray)  # the environment variable is the option's default
    code, _out, err = cli("start", "org/model-a", "--name", "r1", "--port", str(free_port()))
    assert code == 0, err
    rec = StateStore().load("r1")
    assert isinstance(rec, EngineRecord)
    assert rec.settings["ray_address"] == ray
    assert rec.env["RAY_ADDRESS"] == ray
    assert rec.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert rec.argv[rec.argv.index("--distributed-executor-backend") + 1] == "ray"
    t = time.monotonic()
    code, out, err = cli("status", "--json")
    assert code == 0, err
    assert time.monotonic() - t < ray_cluster.QUERY_TIMEOUT_S + 3  # bounded even though nothing answers
    doc = json.loads(out)
    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[2] / "src" / "sage_llm" / "data" /
                         "status.schema.json").read_text())
    jsonschema.validate(doc, schema)
    eng = next(e for e in doc["engines"] if e["name"] == "r1")
    assert eng["state"] == "ready"
    assert eng["ray"]["address"] == ray
    assert eng["ray"]["error"]  # no Ray here to ask: said, not raised
    code, out, _err = cli("status")
    assert f"r1: Ray cluster {ray} (" in out
    # an engine without Ray has no "ray" entry
    monkeypatch.delenv("RAY_ADDRESS")
    code, _out, err = cli("start", "org/model-b", "--name", "r2", "--port", str(free_port()))
    assert code == 0, err
    code, out, _err = cli("status", "--json")
    eng2 = next(e for e in json.loads(out)["engines"] if e["name"] == "r2")
    assert "ray" not in eng2
    code, _out, err = cli("stop", "r1")
    assert code == 0, err


def test_restart_can_drop_ray(cli):
    code, _out, err = cli("start", "org/model-a", "--name", "r3", "--port", str(free_port()), "--ray-address", "auto")
    assert code == 0, err
    code, _out, err = cli("restart", "r3", "--ray-address", "")
    assert code == 0, err
    rec = StateStore().load("r3")
    assert isinstance(rec, EngineRecord)
    assert rec.settings["ray_address"] is None
    assert "--distributed-executor-backend" not in rec.argv
    assert "RAY_ADDRESS" not in rec.env


def test_bad_ray_address_is_refused(cli):
    code, _out, err = cli("start", "org/model-a", "--ray-address", "http://head")
    assert code == 2
    assert "is not a Ray cluster address" in err
    assert StateStore().names() == []


def test_describe_and_job_matching():
    info = {"address": "10.0.0.1:6379", "error": None, "workers": [{"node": "10.0.0.2"}, {"node": "10.0.0.2"},
                                                                   {"node": "10.0.0.3"}],
            "nodes": [{"address": "10.0.0.2", "alive": True, "gpus": 4}, {"address": "10.0.0.3", "alive": True,
                                                                            "gpus": 4}]}
    assert ray_cluster.describe(info) == ("Ray cluster 10.0.0.1:6379: 2 node(s), 8 GPU(s); workers: 2 on 10.0.0.2, "
                                          "1 on 10.0.0.3")
    now = time.time()
    rec = EngineRecord(name="e", model="m", served_model_name="m", host="127.0.0.1", port=19601, pid=100,
                       create_time=now - 60)
    me = 1  # a live process started long before: some other program's driver
    data = {"jobs": [
        {"job_id": "01", "driver_pid": 100, "driver_ip": "10.9.9.9", "start_ms": (now - 59) * 1000},  # the API server
        # EngineCore, gone
        {"job_id": "02", "driver_pid": 4_190_000, "driver_ip": "127.0.0.1", "start_ms": (now - 50) * 1000},
        {"job_id": "03", "driver_pid": me, "driver_ip": "127.0.0.1", "start_ms": (now - 50) * 1000},  # alive: not ours
        # before the engine
        {"job_id": "04", "driver_pid": 4_190_001, "driver_ip": "127.0.0.1", "start_ms": (now - 600) * 1000},
        # another machine's driver
        {"job_id": "05", "driver_pid": 4_190_002, "driver_ip": "10.9.9.9", "start_ms": (now - 50) * 1000},
    ]}
    assert ray_cluster.engine_jobs(data, rec) == {"01", "02"}
    assert ray_cluster.engine_jobs(data, rec, pids={me}) == {"01", "02", "03"}
