#!/usr/bin/env python3
"""The gateway's cluster mode on the Ray namespace tier (issue 23): replicas on two nodes, the cross-node hop, a node
killed under load.

Four Ray nodes on this machine, each in a network + PID namespace of its own (tests/support/netns.py: a bridge on a
blackholed test subnet; run as root):
  A  the head (`--num-cpus 1 --num-gpus 0`), the gateway (`python -m sage_llm.gateway`, options `cluster`) and this
     script's load generator (its sockets in A's network namespace);
  B, C, D  one logical GPU each (`--num-gpus 1`): the fake vLLM (tests/fakes/fake_vllm.py) of fixed capacity,
     --max-num-seqs 4, 32 tokens 10 ms apart (about 0.33 s a request: one engine serves some 12 requests/s).
The gateway has two models: `bench/one` (replicas = 1, pinned to node_d) and `bench/two` (replicas = 2: on B and C,
the nodes with a GPU left). Every engine reads its API key from SAGE_LLM_CLUSTER_KEY on its node.
  a. saturation: streamed requests at c=32 to bench/one, then to bench/two, alternated --reps times: throughput
     (requests / wall time) and its ratio within each pair (goal: >= 1.8);
  b. the hop: TTFT (first content token) at c=1 through the gateway on A (a fixed session header: one replica of
     bench/two) and straight from A to that engine on its node (with the key), interleaved request by request;
     p50 per rep (goal: <= +1 ms);
  c. a node killed: bench/one is stopped (node D free), 32 workers stream to bench/two, the node of one replica is
     SIGKILLed (`node.kill()`: every process of the node at once); requests that failed before their first byte
     (goal 0: no data frame of an answer reached the client: an error status, an error event first, a timeout
     with nothing), streams cut after it (an error event or a timeout after data frames), and the time until two
     replicas serve again (goal: a replica's load time + 5 s; the load time is bench/one's cold load through the
     gateway). The killed node is started again; the next rep kills the node of the newest replica.

  sudo .venv/bin/python bench/bench_cluster.py [--requests 192] [--reps 3] [--hop 50] [--kills 2] [--fast-death]
                                               [--silent] [--json OUT] [--gateway-log PATH]
--fast-death: the head declares a node dead after 2 missed health checks 1 s apart (Ray's default: 5, 3 s apart);
--silent: the killed node's link goes down first, so nothing answers for it (by default its network namespace
outlives it and resets connections to its dead ports). Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aiohttp
from _common import FAKE_VLLM, ROOT, machine
from bench_replicas import CAPACITY, DELAY_S, TOKENS

sys.path.insert(0, str(ROOT))
from tests.support import netns

ONE, TWO = "bench/one", "bench/two"
KEY_ENV = "SAGE_LLM_CLUSTER_KEY"
GATEWAY_PORT = 8901  # A's own loopback: the namespace is this run's
LOAD_S = 0.5
FAST_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2, "health_check_timeout_ms": 1000}


def body(model: str) -> dict[str, Any]:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def stream(s: aiohttp.ClientSession, url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """One streamed request, read frame by frame: status, engine, TTFT (first content token), `frames` (data
    frames from the engine before any error event: 0 means nothing of an answer reached the client), whether it
    ended well (`[DONE]`, no error event), else what ended it (a stream silent for --read-timeout s times out)."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"status": None, "engine": None, "ttft": None, "frames": 0, "done": False,
                           "error_event": False, "exc": None}
    buf = b""
    try:
        async with s.post(url, json=payload, headers=headers or {}) as r:
            out["status"], out["engine"] = r.status, r.headers.get("x-sage-llm-engine")
            async for chunk in r.content.iter_any():
                buf += chunk
                *frames, buf = buf.split(b"\n\n")
                for frame in frames:
                    if frame.startswith(b"data: [DONE]"):
                        out["done"] = True
                    elif b'"error"' in frame:
                        out["error_event"] = True
                    elif frame.startswith(b"data:") and not out["error_event"]:
                        out["frames"] += 1
                        if out["ttft"] is None and b'"content": "tok' in frame:
                            out["ttft"] = time.perf_counter() - t0
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        out["exc"] = type(exc).__name__
    out["ok"] = out["status"] == 200 and out["done"] and not out["error_event"] and out["exc"] is None
    out["elapsed"] = time.perf_counter() - t0
    return out


def config(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "llm.toml"
    args = f'args = ["--max-num-seqs", "{CAPACITY}"]'
    path.write_text(f'[gateway.models."{ONE}"]\n{args}\nreplicas = 1\nnode = "node_d"\n\n'
                    f'[gateway.models."{TWO}"]\n{args}\nreplicas = 2\n')
    return path


def start_gateway(a: netns.Node, home: Path, key: str, head: str) -> netns.NsProcess:
    env = {**a.env, "SAGE_LLM_HOME": str(home), "SAGE_LLM_CONFIG": str(config(home)), KEY_ENV: key}
    opts = {"host": "127.0.0.1", "port": GATEWAY_PORT, "ttl": 0, "external": False, "fallback": False,
            "cluster": head, "cluster_key_env": KEY_ENV}
    log = open(home / "gateway.log", "wb")  # the gateway's own log, shown when the run fails
    return a.popen([sys.executable, "-m", "sage_llm.gateway", "--options", json.dumps(opts)], env=env,
                   stdout=log, stderr=log, cwd=home)


class Client:
    """The load generator, in A's network namespace; the gateway at 127.0.0.1 there."""

    def __init__(self, s: aiohttp.ClientSession) -> None:
        self.s = s
        self.base = f"http://127.0.0.1:{GATEWAY_PORT}"
        self.chat = f"{self.base}/v1/chat/completions"

    async def get(self, path: str) -> Any:
        async with self.s.get(self.base + path) as r:
            return await r.json()

    async def healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                async with self.s.get(self.base + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise SystemExit(f"the gateway did not answer /health in {timeout:.0f} s")

    async def ready(self, model: str) -> list[dict[str, Any]]:
        cards = {c["id"]: c for c in (await self.get("/v1/models"))["data"]}
        card = cards.get(model, {})
        return [x for x in card.get("replicas", [card]) if x.get("state") == "ready" and x.get("engine")]

    async def wait_ready(self, model: str, n: int, timeout: float = 180) -> float:
        t0 = time.monotonic()
        while len(await self.ready(model)) < n:
            if time.monotonic() - t0 > timeout:
                models = await self.get("/v1/models")
                raise SystemExit(f"{model}: {n} replica(s) not ready in {timeout:.0f} s: {models}")
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    async def recent_events(self, seconds: float = 2.0) -> list[str]:
        """The data lines /api/events replays (its recent history) and sends within `seconds`."""
        lines: list[str] = []
        with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError):
            async with self.s.get(self.base + "/api/events", timeout=aiohttp.ClientTimeout(total=seconds)) as r:
                async for line in r.content:
                    if line.startswith(b"data:"):
                        lines.append(line.decode(errors="replace").strip())
        return lines

    async def nodes_of(self, model: str) -> dict[str, str]:
        """Engine name -> node address, for the model's ready replicas."""
        names = {x["engine"] for x in await self.ready(model)}
        doc = await self.get("/api/engines")
        return {e["name"]: e.get("node") for e in doc["engines"] if e["name"] in names}


async def saturate(c: Client, model: str, n: int, conc: int) -> float:
    left = [n]

    async def worker(i: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            r = await stream(c.s, c.chat, body(model), {"x-session-id": f"w{i}-{left[0]}"})
            if not r["ok"]:
                raise SystemExit(f"{model}: a request failed during saturation: {r}")
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(conc)))
    return n / (time.perf_counter() - t0)


async def hop(c: Client, pairs: int, key: str) -> tuple[float, float, str]:
    """(direct p50 ms, via p50 ms, node) for one replica of TWO, interleaved request by request."""
    first = await stream(c.s, c.chat, body(TWO), {"x-session-id": "hop"})
    eng = next(e for e in (await c.get("/api/engines"))["engines"] if e["name"] == first["engine"])
    direct_url = f"http://{eng['node']}:{eng['port']}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {key}"}
    via, direct = [], []
    for _ in range(pairs):
        r = await stream(c.s, c.chat, body(TWO), {"x-session-id": "hop"})
        if r["engine"] != first["engine"] or not r["ok"]:
            raise SystemExit(f"the hop's session moved or failed: {r}")
        via.append(r["ttft"])
        d = await stream(c.s, direct_url, body(TWO), auth)
        if not d["ok"]:
            raise SystemExit(f"a direct request to {direct_url} failed: {d}")
        direct.append(d["ttft"])
    return statistics.median(direct) * 1000, statistics.median(via) * 1000, eng["node"]


async def kill_under_load(c: Client, cluster: netns.Cluster, conc: int, silent: bool = False, before_s: float = 2.0,
                          after_s: float = 2.0, timeout: float = 90) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            results.append(await stream(c.s, c.chat, body(TWO), {"x-session-id": f"k{i}-{k}"}))
    before = await c.nodes_of(TWO)
    if len(before) != 2:
        raise SystemExit(f"{TWO}: expected 2 ready replicas before the kill, found {before}; "
                         f"{await c.get('/v1/models')}; {await c.get('/api/engines')}")
    workers = [asyncio.ensure_future(worker(i)) for i in range(conc)]
    await asyncio.sleep(before_s)
    victim_engine, victim_ip = sorted(before.items())[-1]
    victim = next(n for n in cluster.nodes if n.ip == victim_ip)
    loop = asyncio.get_running_loop()
    killed_at = time.monotonic()
    await loop.run_in_executor(None, victim.kill, silent)
    replaced: float | None = None
    after: dict[str, str] = {}
    while time.monotonic() - killed_at < timeout:
        after = await c.nodes_of(TWO)
        if len(after) == 2 and victim_ip not in after.values():
            replaced = time.monotonic() - killed_at
            break
        await asyncio.sleep(0.05)
    card = None if replaced is not None else await c.get("/v1/models")
    await asyncio.sleep(after_s)
    stop.set()
    await asyncio.gather(*workers)
    failed = [r for r in results if not r["ok"] and r["frames"] == 0]
    cut = [r for r in results if not r["ok"] and r["frames"] > 0]
    return {"requests": len(results), "failed_before_first_byte": len(failed), "streams_cut_after_first_byte": len(cut),
            "timed_out": sum(1 for r in failed + cut if "Timeout" in (r["exc"] or "")),
            "cut_by_error_event": sum(1 for r in cut if r["error_event"]),
            "replacement_s": replaced, "killed": victim.name, "before": before, "after": after, "models": card,
            "failures": [{k: r[k] for k in ("status", "exc", "error_event", "elapsed")} for r in failed[:5]]}


async def drive(args: argparse.Namespace, cluster: netns.Cluster, key: str, home: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.read_timeout)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        c = Client(s)
        await c.healthy()
        t0 = time.monotonic()
        first = await stream(s, c.chat, body(ONE))
        out["load_s"] = time.monotonic() - t0  # a cold on-demand load on the cluster, to the first token
        if not first["ok"]:
            raise SystemExit(f"{ONE}: the first request failed: {first}")
        await stream(s, c.chat, body(TWO))
        out["replicas_ready_s"] = await c.wait_ready(TWO, 2)
        out["placement"] = {ONE: await c.nodes_of(ONE), TWO: await c.nodes_of(TWO)}
        if len(set(out["placement"][TWO].values())) != 2:
            print(f"bench_cluster: the replicas of {TWO} share a node: {out['placement']}", file=sys.stderr)
        for _ in range(args.reps):  # --reps 0: the kills only
            one = await saturate(c, ONE, args.requests, 32)
            two = await saturate(c, TWO, args.requests, 32)
            out["runs"].append({"one": one, "two": two, "ratio": two / one})
        out["hop"] = [await hop(c, args.hop, key) for _ in range(args.reps)]
        async with s.post(f"{c.base}/api/local-engine/stop", json={"model": ONE}) as r:
            if r.status != 200:
                raise SystemExit(f"stopping {ONE} failed: {r.status} {await r.text()}")
        out["kills"] = []
        loop = asyncio.get_running_loop()
        for _ in range(args.kills):
            k = await kill_under_load(c, cluster, 32, args.silent)
            out["kills"].append(k)
            if k["replacement_s"] is None:  # what the gateway and Ray say, for the report
                k["records"] = {p.stem: {f: doc.get(f) for f in ("state", "port", "error", "cluster")}
                                for p in sorted((home / "engines").glob("*.json"))
                                for doc in [json.loads(p.read_text())]}
                k["events"] = await c.recent_events()
                k["ray_status"] = (await loop.run_in_executor(None, lambda: cluster.nodes[0].nsexec(
                    str(netns.VENV_BIN / "ray"), "status", "-v", "--address", cluster.head, check=False))).stdout
            dead = cluster.node(k["killed"])
            await loop.run_in_executor(None, dead.ray_start)  # the machine is back: room for the next replacement
            await loop.run_in_executor(None, cluster.wait_nodes)
    return out


def summary(res: dict[str, Any]) -> dict[str, Any]:
    runs = res["runs"]
    direct = [h[0] for h in res["hop"]]
    via = [h[1] for h in res["hop"]]
    reps = [k["replacement_s"] for k in res["kills"] if k["replacement_s"] is not None]
    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    return {"one": med([r["one"] for r in runs]), "two": med([r["two"] for r in runs]),
            "ratio": med([r["ratio"] for r in runs]), "direct_ms": med(direct), "via_ms": med(via),
            "added_ms": med([v - d for d, v in zip(direct, via, strict=True)]), "replacement_s": med(reps)}


def fmt(v: float | None, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def table(res: dict[str, Any]) -> str:
    m, kills = res["summary"], res["kills"]
    landed = [sorted(set(k["after"].values()) - set(k["before"].values())) for k in kills]
    rows = [
        f"machine: {res['machine']}; Ray declares a node dead after "
        + ("2 missed health checks 1 s apart" if res["fast_death"] else "Ray's default health checks")
        + ("; the killed node's link down first (silent)" if res["silent"] else ""),
        f"placement: {res['placement']} (nodes: {res['nodes']})",
        "| measure | median | each run | goal |", "|---|---|---|---|",
        f"| throughput at c=32, 1 / 2 replicas (req/s) | {fmt(m['one'], '{:.1f}')} / {fmt(m['two'], '{:.1f}')} "
        f"(x{fmt(m['ratio'])}) | " + ", ".join(f"x{r['ratio']:.2f}" for r in res["runs"]) + " | >= x1.8 |",
        f"| TTFT p50 at c=1, direct from A / through the gateway on A (ms) | {fmt(m['direct_ms'])} / "
        f"{fmt(m['via_ms'])} (+{fmt(m['added_ms'])}) | " + ", ".join(f"+{v - d:.2f}" for d, v, _ in res["hop"])
        + " | <= +1 ms |",
        "| node killed at c=32: failed before the first byte / cut after it / requests | | "
        + "; ".join(f"{k['failed_before_first_byte']} / {k['streams_cut_after_first_byte']} / {k['requests']}"
                    + (f" ({k['timed_out']} timed out)" if k["timed_out"] else "") for k in kills) + " | 0 / - / - |",
        f"| two replicas serve again after the kill (s) | {fmt(m['replacement_s'])} | "
        + ", ".join(f"{fmt(k['replacement_s'])} ({k['killed']} killed, new on {','.join(n) or '-'})"
                    for k, n in zip(kills, landed, strict=True))
        + f" | <= load ({res['load_s']:.2f} s) + 5 s |",
    ]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=192, help="requests per saturation run")
    ap.add_argument("--reps", type=int, default=3, help="saturation pairs and hop runs")
    ap.add_argument("--hop", type=int, default=50, help="request pairs per hop run")
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--fast-death", action="store_true", help="the head declares a node dead after 2 missed health "
                    "checks 1 s apart (Ray's default: 5 missed, 3 s apart)")
    ap.add_argument("--silent", action="store_true", help="the killed node's link goes down first: nothing answers "
                    "(by default its kernel still resets connections to the dead ports)")
    ap.add_argument("--read-timeout", type=float, default=30.0, help="the client gives up on a request that "
                    "received nothing for this long (s)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--gateway-log", type=Path, help="keep the gateway's log there")
    args = ap.parse_args()
    why = netns.missing()
    if why:
        print(f"bench_cluster: {why}", file=sys.stderr)
        return 2
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base = Path(tmp)
        fake = {"SAGE_LLM_VLLM": f"{sys.executable} {FAKE_VLLM}", "FAKE_VLLM_LOAD_S": str(LOAD_S),
                "FAKE_VLLM_TOKEN_DELAY_S": str(DELAY_S), "FAKE_VLLM_REPLY": " ".join(["tok"] * TOKENS), KEY_ENV: key}
        envs = [{"SAGE_LLM_NODE_STATE_DIR": str(base / f"node-{x}"), **fake} for x in "abcd"]
        args_ = [["--num-cpus", "1", "--num-gpus", "0"]] + [["--num-cpus", "1", "--num-gpus", "1"]] * 3
        if args.fast_death:
            args_[0] += ["--system-config", json.dumps(FAST_DEATH)]
        with netns.ray_cluster(4, node_env=envs, node_args=args_) as cluster:
            a = cluster.nodes[0]
            gw = start_gateway(a, base / "home", key, cluster.head)
            try:
                with a.netns():
                    res = asyncio.run(drive(args, cluster, key, base / "home"))
            except BaseException:
                print((base / "home" / "gateway.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
            finally:
                gw.stop()
                if args.gateway_log:
                    shutil.copy(base / "home" / "gateway.log", args.gateway_log)
            res["nodes"] = {n.name: n.ip for n in cluster.nodes}
            res["fast_death"], res["silent"] = args.fast_death, args.silent
    res["machine"] = machine()
    res["summary"] = summary(res)
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
