"""Chat budgets (issue 5), against local fake servers so only our own overhead is timed.

1. Renderer: `sage-llm chat -p` with its stdout on a pseudo-terminal (Markdown rendering on) keeps up with
   >= 5,000 tokens/s from a fast local stream. The fake cloud API streams a Markdown reply as fast as it can; the
   chat's own stats line gives the tokens/s it consumed (each token is rendered before the next is read), and
   getrusage gives the chat process's CPU time (minus that of the same command with a 1-token reply: CPU per
   token). The same stream read by a bare httpx loop shows what the server can give, and the renderer fed from
   memory at exactly 5,000 tokens/s shows whether it keeps up on its own (lag at the end) and its CPU cost.
2. TTFT: time to first token through `chat -p` within 20 ms of a bare httpx streaming request to the same server
   (the fake vLLM, started as a managed engine), measured interleaved in the same run. `chat -p` is timed in-process
   from the call of the CLI entry (`sage_llm.cli.main.run`: argument parsing, engine lookup and probe, client set-up,
   request) to the first byte written to stdout; the bare request from building its httpx client to its first
   content token. The cold figure (a new `sage` process, interpreter start and imports included) is reported too.

Usage: python bench/bench_chat.py [--runs N] [--tokens N]   (prints a JSON summary; ports from bench/_common.py)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, ROOT, fake_env, free_port, machine, median

FAKE_OPENAI = ROOT / "tests" / "fakes" / "fake_openai.py"
STATS = re.compile(r"ttft ([\d.]+) s · ([\d.]+) tokens/s · (\S+) prompt \+ (\d+) completion tokens · ([\d.]+) s")


def wait_port(port: int, timeout: float = 10.0) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


# ------------------------------------------------------------------------------------------------------ renderer
def run_on_pty(cmd: list[str], env: dict[str, str]) -> tuple[str, float, float]:
    """Run with stdout on a pty (100x40, drained by a thread); returns (stderr, wall s, CPU s of the child)."""
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    drained = [0]

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            drained[0] += len(data)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, text=True,
                          check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.close(slave)
    t.join(timeout=2)
    os.close(master)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.stderr, wall, cpu


def bare_rate(base_url: str, key: str) -> float:
    """Tokens/s a bare httpx SSE loop gets from the same stream (no rendering)."""
    import httpx

    with httpx.Client(timeout=60) as c, c.stream(
            "POST", base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": "cloud-model", "stream": True, "messages": [{"role": "user", "content": "go"}]}) as r:
        n, first, last = 0, None, None
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    return (n - 1) / (last - first)


def renderer_paced(tokens: int, rate: float = 5000.0) -> dict[str, float]:
    """The Markdown renderer fed from memory at exactly `rate` tokens/s into a terminal console (on /dev/null):
    does it keep up (lag at the end), and at what CPU cost per token?"""
    from rich.console import Console

    sys.path.insert(0, str(ROOT))
    from tests.fakes.fake_openai import markdown_pieces

    from sage_llm.cli.commands.chat import MarkdownRenderer

    pieces = markdown_pieces(tokens)
    with open(os.devnull, "w") as null:
        con = Console(file=null, force_terminal=True, width=100, height=40, markup=False, emoji=False,
                      highlight=False)
        r = MarkdownRenderer(con)
        c0, t0 = time.process_time(), time.monotonic()
        for i, p in enumerate(pieces):
            due = t0 + i / rate
            ahead = due - time.monotonic()
            if ahead > 0.002:
                time.sleep(ahead)
            r.feed(p)
        streamed = time.monotonic()
        lag = streamed - (t0 + (len(pieces) - 1) / rate)
        r.finish()
        cpu = time.process_time() - c0
    return {"rate": rate, "achieved_tokens_per_s": round(len(pieces) / (streamed - t0)), "lag_s": round(lag, 3),
            "cpu_s": round(cpu, 3), "cpu_us_per_token": round(cpu / len(pieces) * 1e6, 1),
            "refreshes": r.refreshes}


def bench_renderer(runs: int, tokens: int) -> dict[str, object]:
    port = free_port()
    key = "sk-bench"
    server = subprocess.Popen([sys.executable, str(FAKE_OPENAI), "--port", str(port), "--key", key,
                               "--markdown", str(tokens)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        base = f"http://127.0.0.1:{port}/v1"
        home = Path(tempfile.mkdtemp(prefix="sage-bench-chat-"))
        env = fake_env(home, SAGE_CHAT_BASE_URL=base, SAGE_CHAT_API_KEY=key, SAGE_CHAT_MODEL="cloud-model",
                       TERM="xterm-256color", COLUMNS="100", LINES="40")
        env.pop("NO_COLOR", None)
        rendered, plain, bare, cpu, cpu_plain, cpu_base = [], [], [], [], [], []
        for _ in range(runs):
            # the same command for a 1-token reply: process start-up, imports, request (subtracted below)
            _err, _wall, c = run_on_pty([str(BIN / "sage-llm"), "chat", "--source", "cloud", "-p", "go",
                                         "--max-tokens", "1"], env)
            cpu_base.append(c)
            err, _wall, c = run_on_pty([str(BIN / "sage-llm"), "chat", "--source", "cloud", "-p", "go"], env)
            m = STATS.search(err)
            assert m, err
            assert int(m.group(4)) == tokens, err
            rendered.append(float(m.group(2)))
            cpu.append(c)
            err, _wall, c = run_on_pty([str(BIN / "sage-llm"), "chat", "--source", "cloud", "-p", "go",
                                        "--plain"], env)
            m = STATS.search(err)
            assert m, err
            plain.append(float(m.group(2)))
            cpu_plain.append(c)
            bare.append(bare_rate(base, key))
        per_token_md = (median(cpu) - median(cpu_base)) / tokens
        per_token_plain = (median(cpu_plain) - median(cpu_base)) / tokens
        return {
            "tokens": tokens,
            "markdown_tokens_per_s": round(median(rendered)),
            "plain_tokens_per_s": round(median(plain)),
            "bare_httpx_tokens_per_s": round(median(bare)),
            "markdown_process_cpu_s": round(median(cpu), 3),
            "plain_process_cpu_s": round(median(cpu_plain), 3),
            "one_token_process_cpu_s": round(median(cpu_base), 3),
            "markdown_cpu_us_per_token": round(per_token_md * 1e6, 1),
            "plain_cpu_us_per_token": round(per_token_plain * 1e6, 1),
            "markdown_cpu_bound_tokens_per_s": round(1 / per_token_md),
            "renderer_paced": renderer_paced(tokens),
            "runs": runs,
        }
    finally:
        server.terminate()
        server.wait(5)


# ---------------------------------------------------------------------------------------------------------- TTFT
class FirstWrite(io.TextIOBase):
    def __init__(self) -> None:
        self.first: float | None = None
        self.text = ""

    def write(self, s: str) -> int:
        if s and self.first is None:
            self.first = time.monotonic()
        self.text += s
        return len(s)

    def isatty(self) -> bool:
        return False


def bare_ttft(client: object, base_url: str) -> float:
    """A bare httpx streaming request (client already built): from sending it to the first content token."""
    t0 = time.monotonic()
    with client.stream(  # type: ignore[attr-defined]
            "POST", base_url + "/chat/completions",
            json={"model": "org/Tiny-Chat", "stream": True, "stream_options": {"include_usage": True},
                  "messages": [{"role": "user", "content": "hi"}]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                return time.monotonic() - t0
    raise RuntimeError("no content")


REQUEST_SENT: list[float] = []


def _hook_request_start() -> None:
    """Note when `chat` sends its request (ChatStream.__enter__), to split its TTFT from its set-up."""
    from sage_llm.chat.client import ChatStream

    orig = ChatStream.__enter__
    if getattr(orig, "_bench", False):
        return

    def enter(self: ChatStream) -> ChatStream:
        REQUEST_SENT.append(time.monotonic())
        return orig(self)

    enter._bench = True  # type: ignore[attr-defined]
    ChatStream.__enter__ = enter  # type: ignore[method-assign]


def cli_ttft(name: str) -> tuple[float, float]:
    """`chat NAME -p hi --plain` in-process: (request sent -> first byte on stdout, CLI entry -> first byte)."""
    from sage_llm.cli import _output
    from sage_llm.cli.main import run

    _hook_request_start()
    sink = FirstWrite()
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = sink, io.StringIO()  # type: ignore[assignment]
    _output.reset()
    try:
        t0 = time.monotonic()
        code = run(["chat", name, "-p", "hi", "--plain"], "sage-llm")
    finally:
        sys.stdout, sys.stderr = old_out, old_err
    if code != 0 or sink.first is None:
        raise RuntimeError(sink.text)
    return sink.first - REQUEST_SENT[-1], sink.first - t0


def cold_ttft(name: str, env: dict[str, str]) -> float:
    """A fresh `sage-llm chat NAME -p hi` process: from spawn to its first byte on stdout."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(BIN / "sage-llm"), "chat", name, "-p", "hi", "--plain"], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    p.stdout.read(1)
    first = time.perf_counter() - t0
    p.communicate()
    return first


def bench_ttft(runs: int) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="sage-bench-chat-"))
    env = fake_env(home)
    port = free_port()
    os.environ.update({k: env[k] for k in ("SAGE_LLM_HOME", "SAGE_LLM_VLLM", "FAKE_VLLM_LOAD_S")})
    os.environ["SAGE_LOCAL_ENGINE_PORT"] = str(port)
    for var in ("SAGE_CHAT_API_KEY", "OPENAI_API_KEY"):
        os.environ.pop(var, None)
    subprocess.run([str(BIN / "sage-llm"), "start", "org/Tiny-Chat", "--port", str(port)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        import httpx

        client = httpx.Client(timeout=30)
        cli_ttft("tiny-chat")  # warm: imports, as in any long-lived process
        bare_ttft(client, base)
        bare, req, entry, cold = [], [], [], []
        for _ in range(runs):  # interleaved
            bare.append(bare_ttft(client, base))
            r, e = cli_ttft("tiny-chat")
            req.append(r)
            entry.append(e)
        client.close()
        for _ in range(max(3, runs // 4)):
            cold.append(cold_ttft("tiny-chat", env))
        diff = median(req) - median(bare)
        return {"bare_httpx_ttft_ms": round(median(bare) * 1000, 2),
                "chat_p_ttft_ms": round(median(req) * 1000, 2),
                "difference_ms": round(diff * 1000, 2), "within_20ms": diff <= 0.020,
                "chat_p_from_cli_entry_ms": round(median(entry) * 1000, 1),
                "cold_process_first_byte_ms": round(median(cold) * 1000, 1), "runs": runs}
    finally:
        subprocess.run([str(BIN / "sage-llm"), "stop", "--all"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--only", choices=("renderer", "ttft"))
    args = ap.parse_args()
    doc: dict[str, object] = {"machine": machine()}
    if args.only != "ttft":
        doc["renderer"] = bench_renderer(args.runs, args.tokens)
    if args.only != "renderer":
        doc["ttft"] = bench_ttft(max(args.runs, 10))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
