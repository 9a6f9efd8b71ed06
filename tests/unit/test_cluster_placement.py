"""Choosing a node for `start --cluster` (engine/cluster.py), on node tables as Ray reports them: no cluster needed."""

from __future__ import annotations

import pytest

from sage_llm.core.errors import UsageError
from sage_llm.engine import cluster
from sage_llm.engine.vllm import LaunchSpec


def _node(node_id: str, address: str, gpus: float, free_gpus: float, alive: bool = True, **custom: float) -> dict:
    res = {"CPU": 4.0, "memory": 1e9, f"node:{address}": 1.0, **custom}
    if gpus:
        res["GPU"] = gpus
    return {"node_id": node_id, "address": address, "hostname": f"host-{address}", "alive": alive,
            "resources": res, "free": {"CPU": 4.0, "GPU": free_gpus}}


NODES = [_node("a" * 56, "10.0.0.1", 0, 0), _node("b" * 56, "10.0.0.2", 4, 1, node_b=1.0),
         _node("c" * 56, "10.0.0.3", 8, 8, alive=False)]


@pytest.mark.parametrize("name", ["b" * 56, "bbbbbbbb", "10.0.0.2", "node:10.0.0.2", "host-10.0.0.2", "node_b"])
def test_a_node_is_named_by_id_prefix_address_hostname_or_own_resource(name):
    assert cluster.choose_node(NODES, name, 2)["node_id"] == "b" * 56


def test_unknown_dead_and_short_nodes_are_usage_errors_naming_the_nodes():
    with pytest.raises(UsageError, match=r"--node 'nope' is not a node of the cluster; nodes: aaaaaaaa \(10.0.0.1\), "
                                         r"bbbbbbbb \(10.0.0.2, node_b\)"):
        cluster.choose_node(NODES, "nope", 1)
    with pytest.raises(UsageError, match=r"--node '10\.0\.0\.3' is dead"):
        cluster.choose_node(NODES, "10.0.0.3", 1)
    with pytest.raises(UsageError, match=r"node '10.0.0.1' has 0 GPU\(s\), the engine needs 1"):
        cluster.choose_node(NODES, "10.0.0.1", 1)
    with pytest.raises(UsageError, match="bbb"):  # a 3-character prefix names no node (8 at least)
        cluster.choose_node(NODES, "bbb", 1)


def test_without_node_ray_chooses_but_the_gpus_must_exist_somewhere():
    assert cluster.choose_node(NODES, None, 4) is None
    with pytest.raises(UsageError, match=r"no node of the cluster has 5 GPU\(s\).*10.0.0.2 \(bbbbbbbb\): 1/4 GPU"):
        cluster.choose_node(NODES, None, 5)


def test_gpus_are_tensor_times_pipeline_and_none_on_a_cpu_cluster():
    spec = LaunchSpec(model="org/m", host="127.0.0.1", port=8000, gpu_memory_utilization=0.9,
                      tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=3)
    assert cluster.gpus_for(spec, NODES) == 4
    assert cluster.gpus_for(spec, [NODES[0]]) == 0


@pytest.mark.parametrize("address", ["", "auto", "ray://h:10001", "host", "h:port", "a b:1"])
def test_cluster_address_must_be_host_port(address):
    with pytest.raises(UsageError, match="is not HOST:PORT of a Ray head"):
        cluster.check_address(address)


def test_without_ray_the_error_says_what_to_install(monkeypatch, cli):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    code, _out, err = cli("start", "org/m", "--cluster", "127.0.0.1:6379")
    assert code == 2
    assert "--cluster needs Ray, which is not installed" in err
    assert "pip install 'sage-llm[ray]'" in err


def test_bind_host_is_the_node_address_unless_given():
    assert cluster.bind_host("127.0.0.1", "10.0.0.2") == "10.0.0.2"
    assert cluster.bind_host("0.0.0.0", "10.0.0.2") == "0.0.0.0"


def _spec(**kw) -> LaunchSpec:
    return LaunchSpec(model="org/m", host="127.0.0.1", port=8000, gpu_memory_utilization=0.9, **kw)


@pytest.mark.parametrize(("kw", "gpus"), [({}, 1), ({"tensor_parallel_size": 2}, 2),
                                          ({"extra_args": ["--tensor-parallel-size", "2"]}, 2),
                                          ({"extra_args": ["-tp", "4", "--pipeline-parallel-size=2"]}, 8),
                                          ({"pipeline_parallel_size": 2, "extra_args": ["-tp=2"]}, 4)])
def test_an_engine_asks_ray_for_tp_x_pp_gpus_given_as_options_or_after_the_double_dash(kw, gpus):
    assert cluster.gpus_for(_spec(**kw), NODES) == gpus
    assert cluster.gpus_for(_spec(**kw), [NODES[0]]) == 0  # a cluster without GPUs: CPU engines, none asked


def test_a_new_replica_prefers_the_node_with_room_and_fewest_of_its_model_and_avoids_suspects():
    b2 = _node("d" * 56, "10.0.0.4", 4, 3)
    nodes = [*NODES, b2]
    assert cluster.preferred_node(nodes, 1, {}, set()) is None  # nothing to spread from: Ray's own choice
    assert cluster.preferred_node(nodes, 1, {"b" * 56: 1}, set()) == "d" * 56  # another node than its sibling's
    assert cluster.preferred_node(nodes, 1, {"b" * 56: 1, "d" * 56: 1}, set()) == "d" * 56  # tie: more free GPUs
    assert cluster.preferred_node(nodes, 1, {}, {"d" * 56}) == "b" * 56  # a node suspected dead is avoided
    assert cluster.preferred_node(nodes, 8, {"b" * 56: 1}, set()) is None  # only the dead node has 8 GPUs
