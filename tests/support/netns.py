"""Ray nodes on one machine, each in a network + PID namespace of its own: the namespace tier of the cluster tests
(tests/integration/test_cluster_netns_real.py) and of bench/bench_cluster.py.

`ray_cluster(n, ...)` builds N nodes (node 0 the head) on a /24 of 10.231.X.0/24 and removes everything at exit,
also on a failure or KeyboardInterrupt:
  * the test subnet is blackholed in the root namespace FIRST (a mistaken packet can never leave the machine); the
    route is removed last. Adding that route is also the lock that picks the subnet: a subnet whose route exists
    belongs to another run on this machine, so the next one is tried;
  * each node is a network namespace (`ip netns add`) with one veth: two nodes are a veth pair, more hang off a
    bridge in a namespace of its own;
  * inside it, a PID namespace (`unshare --pid --fork --mount-proc`, its own /proc, so `ray stop` there sees only the
    node's processes) whose pid 1 is a `sleep`: `ray stop` and a dead raylet leave the namespace alive, and
    SIGKILL of that pid 1 (`node.kill()`) kills every process in it at once, as when a machine dies;
  * `ray start` in it with the node's own arguments and environment (`--resources {"node_x": 1}` always: node_a,
    node_b, ... pin work to a node).

Each Node offers `nsexec(...)` (a command to completion inside its namespaces), `popen(...)` (a long-lived process
inside them, e.g. a gateway), `kill()` (`kill(silent=True)`: its link down first), `ray_start()` (again after `ray
stop` or `kill()`: a killed node boots a new PID namespace first), `raylet_pid()`, and `netns()`: the calling
thread's sockets in the node's network namespace (a load generator "on" node A without a subprocess).

SAGE_LLM_NETNS_KEEP_LOGS=DIR keeps each node's Ray logs (DIR/node_x) when the nodes are removed.

Needs root and iproute2, util-linux (`unshare`, `nsenter`) and procps (`pgrep`); `missing()` says what is absent.
Traffic stays on the namespaces' own links: nothing is routed out of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
RAY_PORT = 6379
CLONE_NEWNET = 0x40000000
TOOLS = ("ip", "unshare", "nsenter", "pgrep")


def missing() -> str | None:
    """Why this machine cannot build namespace nodes (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network + PID namespaces)"
    absent = [t for t in TOOLS if not shutil.which(t)]
    if absent:
        return f"needs {', '.join(absent)} (iproute2, util-linux, procps)"
    if not (VENV_BIN / "ray").exists():
        return f"needs Ray in {VENV_BIN} (pip install 'sage-llm[ray]')"
    return None


def run(*cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, **kw)


def wait(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `cond` until it returns something true (returned) or `timeout` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _children(pid: int) -> list[int]:
    return [int(p) for p in run("pgrep", "-P", str(pid), check=False).stdout.split()]


class NsProcess:
    """A long-lived process inside a node's namespaces: `nsenter` (in the root namespace) forks it; `pid` is the
    process itself as the root namespace numbers it, which signals go to (nsenter forwards none)."""

    def __init__(self, popen: subprocess.Popen[bytes], what: str) -> None:
        self.popen = popen

        def child() -> int | None:
            kids = _children(popen.pid)
            if kids:
                return kids[0]
            if popen.poll() is not None:
                raise RuntimeError(f"{what} exited with {popen.returncode} at once")
            return None

        self.pid: int = wait(child, 10, f"{what} to start", interval=0.02)

    def poll(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit status (None when it had to be killed)."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        self.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.popen.wait(10)
            return None


@dataclass
class Node:
    """One Ray node: a network namespace, a PID namespace inside it, a raylet (and the head's GCS on node 0)."""

    name: str  # node_a, node_b, ...: also the custom resource only this node has
    ip: str
    ns: str  # the network namespace's name
    head: str  # HOST:PORT of the head's GCS
    env: dict[str, str]
    ray_args: list[str]
    is_head: bool = False
    temp_dir: str = ""
    link: str = ""  # its veth, in its network namespace
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def boot(self) -> None:
        """A fresh PID namespace (its pid 1 a `sleep`) in the node's network namespace."""
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "unshare", "--pid", "--fork",
                                      "--mount-proc", "--kill-child", "sleep", "infinity"], env=self.env,
                                     stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # unshare's notes on kill
        wait(self.init_pid, 10, f"{self.name}'s PID namespace")

    def init_pid(self) -> int | None:
        """The namespace's pid 1 (the `sleep`), as the root namespace numbers it; None when the node is down."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        kids = _children(self.proc.pid)
        return kids[0] if kids else None

    @property
    def alive(self) -> bool:
        return self.init_pid() is not None

    def enter(self) -> list[str]:
        """The command prefix that runs a program inside the node's network, PID and mount namespaces."""
        pid = self.init_pid()
        if pid is None:
            raise RuntimeError(f"{self.name} is down: ray_start() boots it again")
        return ["nsenter", "-t", str(pid), "-p", "-m", "-n", "--"]

    def nsexec(self, *cmd: str, check: bool = True, timeout: float = 120,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `cmd` to completion inside the node (environment: the node's, or `env`)."""
        return run(*self.enter(), *cmd, check=check, env=dict(env if env is not None else self.env), timeout=timeout)

    def popen(self, cmd: Sequence[str], env: Mapping[str, str] | None = None, **kw: Any) -> NsProcess:
        """Start a long-lived process inside the node; it dies with the node at the latest."""
        p = subprocess.Popen([*self.enter(), *cmd], env=dict(env if env is not None else self.env),
                             stdin=subprocess.DEVNULL, **kw)
        return NsProcess(p, f"{cmd[0]} on {self.name}")

    def ray_start(self) -> None:
        """`ray start` on the node (booting its PID namespace first when it is down)."""
        if not self.alive:
            run("ip", "-n", self.ns, "link", "set", self.link, "up")  # after kill(silent=True)
            self.boot()
        role = (["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"] if self.is_head
                else ["--address", self.head])
        r = self.nsexec(str(VENV_BIN / "ray"), "start", "--node-ip-address", self.ip, "--temp-dir", self.temp_dir,
                        "--disable-usage-stats", "--min-worker-port", "24300", "--max-worker-port", "24399",
                        "--object-store-memory", str(80 * 2**20), "--resources", json.dumps({self.name: 1}),
                        *role, *self.ray_args, check=False, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start on {self.name} failed ({r.returncode}): {r.stderr[-2000:]}")

    def ray_stop(self) -> None:
        self.nsexec(str(VENV_BIN / "ray"), "stop", "--force", check=False)

    def raylet_pid(self) -> int | None:
        out = run("pgrep", "-f", f"raylet.*{self.temp_dir}", check=False).stdout.split()
        return int(out[0]) if out else None

    def kill(self, silent: bool = False) -> None:
        """SIGKILL the namespace's pid 1: the kernel kills every process in the node at once. Its network namespace
        stays, with its address, and answers connections to the dead ports with resets; `silent`: its link goes
        down first, so nothing answers at all (packets to it are dropped, as to a machine without power)."""
        if silent:
            run("ip", "-n", self.ns, "link", "set", self.link, "down")
        pid = self.init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:  # unshare itself (--kill-child: its child goes with it)
                self.proc.kill()
                self.proc.wait(10)

    @contextlib.contextmanager
    def netns(self) -> Iterator[None]:
        """The calling thread in the node's network namespace (sockets it opens are the node's) until exit."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net") as back, open(f"/var/run/netns/{self.ns}") as target:
            if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.ns}")
            try:
                yield
            finally:
                if libc.setns(back.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the root network namespace")


@dataclass
class Cluster:
    nodes: list[Node]
    subnet: str
    head: str  # HOST:PORT of the head's GCS

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def alive_nodes(self) -> set[str]:
        """The nodes the head counts alive, by name (`ray status -v` on the head: each live node's resources,
        among them the custom resource node_x)."""
        r = self.nodes[0].nsexec(str(VENV_BIN / "ray"), "status", "-v", "--address", self.head, check=False,
                                 timeout=60)
        names = {n.name for n in self.nodes}
        found = set()
        for section in r.stdout.split("\nNode: ")[1:]:
            for line in section.splitlines()[1:]:
                word = line.split()[-1] if line.split() else ""
                if word in names:
                    found.add(word)
        return found

    def wait_nodes(self, names: set[str] | None = None, timeout: float = 120) -> None:
        """Until the head counts exactly `names` (default: every node) alive."""
        want = {n.name for n in self.nodes} if names is None else names
        seen: list[set[str]] = [set()]

        def alive() -> bool:
            seen[0] = self.alive_nodes()
            return seen[0] == want

        try:
            wait(alive, timeout, f"Ray nodes {sorted(want)} alive", interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc} (alive at the end: {sorted(seen[0])})") from None


def _claim_subnet(cleanup: list[list[str]]) -> tuple[str, str]:
    """The first 10.231.X.0/24 whose blackhole route this run could add (the route is the lock); (subnet, prefix)."""
    for x in range(256):
        subnet = f"10.231.{x}.0/24"
        if run("ip", "route", "add", "blackhole", subnet, check=False).returncode == 0:
            cleanup.append(["ip", "route", "del", "blackhole", subnet])
            return subnet, f"10.231.{x}"
    raise RuntimeError("no free test subnet in 10.231.0.0/16 (blackhole routes of other runs hold them all)")


def _link(nodes: list[Node], tag: str, cleanup: list[list[str]]) -> None:
    """Two nodes: one veth pair. More: a veth from each node to a bridge in a namespace of its own."""
    if len(nodes) == 2:
        a, b = nodes
        run("ip", "link", "add", f"{tag}v0", "netns", a.ns, "type", "veth", "peer", "name", f"{tag}v1",
            "netns", b.ns)
    else:
        br = f"{tag}br"
        run("ip", "netns", "add", br)
        cleanup.append(["ip", "netns", "del", br])
        run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", br, "link", "set", "br0", "up")
        for i, node in enumerate(nodes):
            run("ip", "link", "add", f"{tag}v{i}", "netns", node.ns, "type", "veth", "peer", "name", f"{tag}p{i}",
                "netns", br)
            run("ip", "-n", br, "link", "set", f"{tag}p{i}", "master", "br0", "up")
    for i, node in enumerate(nodes):
        node.link = f"{tag}v{i}"
        run("ip", "-n", node.ns, "addr", "add", f"{node.ip}/24", "dev", f"{tag}v{i}")
        run("ip", "-n", node.ns, "link", "set", f"{tag}v{i}", "up")
        run("ip", "-n", node.ns, "link", "set", "lo", "up")


def base_env() -> dict[str, str]:
    """This process's environment without Ray's and the engine command's variables, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SAGE_LLM_VLLM"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@contextlib.contextmanager
def ray_cluster(n: int, *, node_env: Sequence[Mapping[str, str]] = (), node_args: Sequence[Sequence[str]] = (),
                env: Mapping[str, str] | None = None) -> Iterator[Cluster]:
    """N Ray nodes (node 0 the head), each started with `ray start` plus node_args[i], in base_env() (or `env`) plus
    node_env[i]. Everything is removed at exit, whatever happened."""
    if n < 2 or n > 26:
        raise ValueError("2 to 26 nodes")
    tag = f"sl{os.getpid() % 100000}"
    cleanup: list[list[str]] = []
    nodes: list[Node] = []
    term = _interrupt_on_term()
    try:
        subnet, prefix = _claim_subnet(cleanup)
        head = f"{prefix}.1:{RAY_PORT}"
        common = dict(env if env is not None else base_env())
        for i in range(n):
            letter = "abcdefghijklmnopqrstuvwxyz"[i]
            ns = f"{tag}{letter}"
            run("ip", "netns", "add", ns)
            cleanup.append(["ip", "netns", "del", ns])
            nodes.append(Node(name=f"node_{letter}", ip=f"{prefix}.{i + 1}", ns=ns, head=head, is_head=i == 0,
                              env={**common, **(node_env[i] if i < len(node_env) else {})},
                              ray_args=list(node_args[i]) if i < len(node_args) else [],
                              temp_dir=f"/tmp/rt{os.getpid() % 10000}{letter}"))  # Ray's socket paths stay short
        _link(nodes, tag, cleanup)
        for node in nodes:
            node.ray_start()
        cluster = Cluster(nodes=nodes, subnet=subnet, head=head)
        cluster.wait_nodes()
        yield cluster
    finally:
        keep = os.environ.get("SAGE_LLM_NETNS_KEEP_LOGS")  # a directory: each node's Ray logs are copied there
        for node in reversed(nodes):
            node.kill()
            if keep:
                with contextlib.suppress(OSError):
                    shutil.copytree(Path(node.temp_dir) / "session_latest" / "logs", Path(keep) / node.name,
                                    dirs_exist_ok=True)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        for cmd in reversed(cleanup):
            run(*cmd, check=False)
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _interrupt_on_term() -> Any:
    """SIGTERM raises KeyboardInterrupt while the nodes exist (main thread only), so that a terminated test run or
    benchmark still removes them; returns the handler to restore (None: not installed)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
