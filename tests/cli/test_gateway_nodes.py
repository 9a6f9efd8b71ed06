"""`gateway status` of a gateway with a cluster: the cluster's nodes and their free GPUs/CPUs as Ray sees them.

The cluster is Ray's own `ray.cluster_utils.Cluster` on loopback (as in test_cluster_fake.py): a head (no GPU) and
node B (one GPU as Ray counts it). The gateway is a real detached gateway (`gateway start`); its record names the
cluster the way a gateway started with `--cluster ADDRESS` records it (the `cluster` key of its options).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port
from tests.support.ray_loopback import import_ray

ray = import_ray()
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.timeout(240, method="thread")]

# reports whether the CLI imported Ray, after it ran
_PROBE = ("import atexit, sys\n"
          "atexit.register(lambda: sys.stderr.write('ray-imported=%s\\n' % ('ray' in sys.modules)))\n"
          "from sage_llm.cli.main import run\n"
          "sys.exit(run(sys.argv[1:], 'sage-llm'))\n")


@pytest.fixture(scope="module")
def cluster():
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
              "min_worker_port": 24400, "max_worker_port": 24499, "object_store_memory": 80 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args={**common, "resources": {"node_a": 1}})
    node_b = c.add_node(**{**common, "min_worker_port": 24500, "max_worker_port": 24599, "num_gpus": 1,
                           "resources": {"node_b": 1}})
    c.wait_for_nodes()
    try:
        yield {"address": c.address, "head": c.head_node.node_id, "node_b": node_b.node_id}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


@pytest.fixture
def gateway(cli, home):
    """A real detached gateway in this test's home; stopped at teardown."""
    code, out, err = cli("gateway", "start", "--port", str(free_port()), "--engine-port", str(free_port()),
                         "--no-external", "--json")
    assert code == 0, err
    yield json.loads(out)
    code, _out, err = cli("gateway", "stop")
    assert code == 0, err


def _name_cluster(home, address: str) -> None:
    """What `gateway start --cluster ADDRESS` records: the address under the record's options."""
    from sage_llm.core.state import atomic_write_json
    from sage_llm.gateway import daemon

    rec = daemon.load_record()
    assert rec is not None
    rec["options"]["cluster"] = address
    atomic_write_json(daemon.record_path(), rec)


def _cli_subprocess(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    return done.returncode, done.stdout, done.stderr


def test_gateway_status_shows_each_node_with_its_free_gpus_and_cpus(cli, home, cluster, gateway):
    # without a cluster: no nodes, and Ray is not even imported
    code, out, err = _cli_subprocess("gateway", "status", "--json")
    assert code == 0, err
    assert "cluster" not in json.loads(out)
    assert "ray-imported=False" in err
    _name_cluster(home, cluster["address"])
    code, out, err = cli("gateway", "status")
    assert code == 0, err
    assert f"cluster {cluster['address']}: 2 of 2 node(s) alive" in out
    assert f"node 127.0.0.1 ({cluster['node_b'][:8]}): 1/1 GPU, 1/1 CPU free" in out
    assert f"node 127.0.0.1 ({cluster['head'][:8]}): 0/0 GPU, 1/1 CPU free" in out
    # free is what Ray has left: an actor holding node B's GPU takes it off
    assert ray.is_initialized()  # `gateway status` joined this process to the cluster (engine/cluster.py connect)

    @ray.remote(num_gpus=1, num_cpus=0)
    class Holder:
        def ping(self) -> bool:
            return True

    holder = Holder.remote()
    assert ray.get(holder.ping.remote(), timeout=60)
    try:
        deadline = time.monotonic() + 30  # Ray's resource view follows the placement within its report period
        while True:
            code, out, err = cli("gateway", "status", "--json")
            assert code == 0, err
            nodes = {n["node_id"]: n for n in json.loads(out)["cluster"]["nodes"]}
            if nodes[cluster["node_b"]]["free"].get("GPU", 0) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert nodes[cluster["node_b"]]["free"].get("GPU", 0) == 0
        assert nodes[cluster["node_b"]]["resources"]["GPU"] == 1
        assert nodes[cluster["head"]]["resources"].get("GPU", 0) == 0
        assert all(n["alive"] for n in nodes.values())
        code, out, _err = cli("gateway", "status")
        assert f"node 127.0.0.1 ({cluster['node_b'][:8]}): 0/1 GPU, 1/1 CPU free" in out
    finally:
        ray.kill(holder)
    # the nodes path imports Ray (the check above can fail)
    code, out, err = _cli_subprocess("gateway", "status", "--json")
    assert code == 0, err
    assert "ray-imported=True" in err
    assert len(json.loads(out)["cluster"]["nodes"]) == 2


def test_a_cluster_that_does_not_answer_costs_gateway_status_its_timeout_only(cli, home, gateway):
    """A head that accepts connections and never answers (ray.init would retry for minutes): `gateway status` says
    so within the bound, exit 0 (the gateway itself runs). Run in a subprocess: the abandoned join stays there."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        _name_cluster(home, address)
        env = {**os.environ, "SAGE_LLM_CLUSTER_JOIN_TIMEOUT": "600"}  # unbounded, this would take 10 minutes
        done = subprocess.run([sys.executable, "-c", _PROBE, "gateway", "status"], capture_output=True, text=True,
                              timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert f"cluster {address}: cannot ask it: the Ray cluster at {address} did not answer within 5 s" in done.stdout
    assert "Traceback" not in done.stderr
    # nothing listens: said at once, one line
    dead = f"127.0.0.1:{free_port()}"
    _name_cluster(home, dead)
    code, out, err = cli("gateway", "status")
    assert code == 0, err
    assert f"cluster {dead}: cannot ask it: the Ray cluster at {dead} is unreachable" in out
