"""Load stages of a starting vLLM engine, read from its log as the log grows.

vLLM prints no single progress figure, so the stage is inferred from the lines it does print (reference: vllm.md §4):

  launching        nothing recognised yet (the banner, `non-default args`)
  resolving        `Resolved architecture`, `Using max model len`, `Initializing a V1 LLM engine`
  downloading      `Starting to load model` while the repo's blobs in the HF cache still have `*.incomplete` files
                   (vLLM disables its own download bar: bytes come from the cache, against the expected size if known)
  loading_weights  `Loading safetensors checkpoint shards:  50% Completed | 1/2` (fraction a/b)
  compiling        `Starting torch.compile`, `Dynamo bytecode transform`, CPU: `Warming up model for the compilation`
  kv_cache         `Available KV cache memory`, `GPU|CPU KV cache size: N tokens, Maximum concurrency ... Yx`
  cuda_graphs      `Capturing CUDA graphs (...): 37%|... | 19/51` (a tqdm bar redrawn with \\r; fraction a/b)
  starting_server  `init engine ... took`, `Starting vLLM server on`, uvicorn's `Started server process`
  ready            uvicorn's `Application startup complete.` (the caller confirms with /health)

Stages only move forward. Parsing is incremental: `LoadProgress.poll()` reads only the bytes appended since the last
call (keeping an offset and a partial-line remainder), splits on both \\n and \\r, and matches each line against a few
substrings before any regex. No Typer or Rich here: the CLI renders `Snapshot`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("launching", "resolving", "downloading", "loading_weights", "compiling", "kv_cache", "cuda_graphs",
          "starting_server", "ready")
RANK = {s: i for i, s in enumerate(STAGES)}
LABELS = {
    "launching": "launching",
    "resolving": "resolving config",
    "downloading": "downloading weights",
    "loading_weights": "loading weights",
    "compiling": "compiling (torch.compile)",
    "kv_cache": "allocating KV cache",
    "cuda_graphs": "capturing CUDA graphs",
    "starting_server": "starting HTTP server",
    "ready": "ready",
}
START_MARKER = b"===== sage llm start "  # written by manager.start() before each spawn

_SPLIT = re.compile(rb"\r\n|\r|\n")
_SHARDS = re.compile(r"Loading (\w+) checkpoint shards.*?:\s+(\d+)% Completed \| (\d+)/(\d+)")
_GRAPHS = re.compile(r"Capturing CUDA graphs[^:]*:\s*(\d+)%.*?\|\s*(\d+)/(\d+)")
_ARCH = re.compile(r"Resolved architecture: (\S+)")
_MAXLEN = re.compile(r"Using max model len (\d+)")
# EngineCore's "Initializing a V1 LLM engine (v0.32.0) with config: model=..., dtype=torch.bfloat16, ..." line: the
# dtype vLLM resolved (after --dtype auto), not the one asked for. \b keeps kv_cache_dtype= and the like out.
_ENGINE_DTYPE = re.compile(r"\bdtype=torch\.(\w+)")
_KV_SIZE = re.compile(r"(GPU|CPU|\w+) KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                      r"request: ([\d.,]+)x")
_KV_MEM = re.compile(r"Available KV cache memory: ([\d.]+) GiB")
_KV_CPU = re.compile(r"Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV cache")
_DL_TIME = re.compile(r"Time spent downloading weights for .*?: ([\d.]+) seconds")
_MAX_REMAINDER = 64 * 1024


@dataclass
class Snapshot:
    """Where a starting engine is: the stage, its fraction (0..1 or None), a short detail, and timings."""

    stage: str = "launching"
    progress: float | None = None  # fraction of the current stage, when the stage has one
    detail: str | None = None  # e.g. "2/4 shards", "1.2 GiB of 15.2 GiB", "643,232 tokens, 15.70x concurrency"
    stage_started: float = 0.0  # wall time the current stage was first seen
    stages: list[tuple[str, float]] = field(default_factory=list)  # (stage, first seen) in order
    last_line: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # architecture, max_model_len, kv_cache_tokens, ...

    @property
    def label(self) -> str:
        return LABELS.get(self.stage, self.stage)

    def stage_elapsed(self, now: float | None = None) -> float:
        return max(0.0, (now if now is not None else time.time()) - self.stage_started)

    def durations(self, now: float | None = None) -> list[tuple[str, float]]:
        """(stage, seconds spent in it) for every stage seen; the current one runs until `now`."""
        now = now if now is not None else time.time()
        out = []
        for i, (name, t) in enumerate(self.stages):
            end = self.stages[i + 1][1] if i + 1 < len(self.stages) else now
            out.append((name, max(0.0, end - t)))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "progress": self.progress, "detail": self.detail}


class StageParser:
    """Turns log lines into a Snapshot. Feed it complete lines (and, with `partial=True`, a line still being drawn)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.snap = Snapshot(stage_started=clock(), stages=[("launching", clock())])
        self.load_started = False  # `Starting to load model` seen: weights are being fetched or read
        self.download_done = False
        self.shards_seen = False

    def enter_downloading(self) -> bool:
        """Weights turned out to be downloading: step back from a `loading_weights` that has shown no shard yet."""
        snap = self.snap
        since = None
        if snap.stage == "loading_weights" and not self.shards_seen and not self.download_done:
            if snap.stages and snap.stages[-1][0] == "loading_weights":
                since = snap.stages.pop()[1]  # the download began when the load did
            snap.stage = "resolving"
        entered = self._enter("downloading")
        if entered and since is not None and snap.stages[-1][0] == "downloading":
            snap.stages[-1] = ("downloading", since)
            snap.stage_started = since
        return entered

    def mark_ready(self) -> None:
        """The caller confirmed readiness (/health and /v1/models)."""
        self._enter("ready")
        self.snap.progress = 1.0

    def _enter(self, stage: str) -> bool:
        snap = self.snap
        if RANK[stage] < RANK[snap.stage]:
            return False
        if stage != snap.stage:
            now = self.clock()
            snap.stage, snap.progress, snap.detail, snap.stage_started = stage, None, None, now
            snap.stages.append((stage, now))
        return True

    def feed_line(self, raw: str, partial: bool = False) -> None:
        line = raw.strip()
        if not line:
            return
        if not partial or len(line) > 3:
            self.snap.last_line = line
        # cheap pre-filter: most lines match none of these
        if "Loading" in line and "checkpoint shards" in line:
            m = _SHARDS.search(line)
            if m and self._enter("loading_weights"):
                self.shards_seen = True
                a, b = int(m.group(3)), int(m.group(4))
                self.snap.progress = a / b if b else None
                self.snap.detail = f"{a}/{b} shards"
            return
        if "Capturing CUDA graphs" in line:
            if self._enter("cuda_graphs"):
                m = _GRAPHS.search(line)
                if m:
                    a, b = int(m.group(2)), int(m.group(3))
                    self.snap.progress = a / b if b else None
                    self.snap.detail = f"{a}/{b} graphs"
            return
        if partial:
            return  # only the tqdm bars above are drawn in place; other lines are parsed once complete
        facts = self.snap.facts
        if "Resolved architecture" in line:
            m = _ARCH.search(line)
            if m:
                facts["architecture"] = m.group(1)
            if self._enter("resolving"):
                self.snap.detail = facts.get("architecture")
        elif "Using max model len" in line:
            m = _MAXLEN.search(line)
            if m:
                facts["max_model_len"] = int(m.group(1))
            if self._enter("resolving"):
                self.snap.detail = ", ".join(x for x in (facts.get("architecture"), m and f"max len {m.group(1)}")
                                             if x)
        elif "Initializing a V1 LLM engine" in line or "replace model_id" in line:
            self._enter("resolving")
        elif "Starting to load model" in line:
            self.load_started = True  # weights are fetched (downloading) or read from here on
            self._enter("loading_weights")
        elif "Time spent downloading weights" in line:
            self.download_done = True
            m = _DL_TIME.search(line)
            if m:
                facts["download_s"] = float(m.group(1))
            self._enter("loading_weights")
        elif "Loading weights took" in line or "Model loading took" in line:
            self._enter("loading_weights")
            if self.snap.stage == "loading_weights":
                self.snap.progress = 1.0
        elif ("torch.compile" in line and ("Starting" in line or "took" in line)) or "Dynamo bytecode" in line \
                or "Compiling a graph" in line or "Directly load the compiled graph" in line \
                or "Warming up model for the compilation" in line or "Compiling model again" in line:
            self._enter("compiling")
        elif "KV cache" in line and ("Available KV cache memory" in line or "KV cache size" in line
                                     or "GiB for KV cache" in line):
            if self._enter("kv_cache"):
                m = _KV_SIZE.search(line)
                if m:
                    facts["kv_cache_tokens"] = int(m.group(2).replace(",", ""))
                    facts["max_concurrency"] = float(m.group(4).replace(",", ""))
                    self.snap.detail = f"{m.group(2)} tokens, {m.group(4)}x concurrency at {m.group(3)} tokens"
                    return
                m = _KV_MEM.search(line) or _KV_CPU.search(line)
                if m:
                    facts["kv_cache_gib"] = float(m.group(1))
                    self.snap.detail = f"{m.group(1)} GiB"
        elif "Graph capturing finished" in line:
            if self._enter("cuda_graphs"):
                self.snap.progress = 1.0
        elif "init engine (profile" in line or "Starting vLLM server on" in line or "Supported tasks" in line \
                or "Started server process" in line or "Waiting for application startup" in line \
                or "vLLM API server" in line:
            self._enter("starting_server")
        elif "Application startup complete" in line:
            self._enter("ready")
            self.snap.progress = 1.0


@dataclass
class _DownloadWatch:
    repo_blobs: Path | None
    expected_bytes: int | None
    last_check: float = 0.0
    seen_incomplete: bool = False

    def measure(self) -> tuple[int, bool] | None:
        """(bytes in the repo's blobs, any .incomplete left) or None when there is no such directory."""
        if self.repo_blobs is None:
            return None
        total, incomplete = 0, False
        try:
            with os.scandir(self.repo_blobs) as it:
                for entry in it:
                    try:
                        total += entry.stat().st_size  # follows links into the hub-2.x shared store
                    except OSError:
                        continue
                    if entry.name.endswith(".incomplete"):
                        incomplete = True
        except OSError:
            return None
        return total, incomplete


class LoadProgress:
    """Incremental reader of one engine's log: call `poll()` as often as you like; it reads only what is new.

    `offset` is where this run's output starts (the byte after `start`'s header line); with `find_start=True` the
    last header in the file is looked for instead. Truncation (size below the offset) and replacement (another inode,
    as after rotation) restart the read from the top of the new file.
    """

    def __init__(self, path: str | Path, offset: int | None = None, find_start: bool = True, model: str | None = None,
                 hf_cache: Path | None = None, expected_bytes: int | None = None,
                 clock: Callable[[], float] = time.time, download_check_s: float = 1.0,
                 size_lookup: Callable[[str], int | None] | None = None) -> None:
        self.path = Path(path)
        self.parser = StageParser(clock)
        self.clock = clock
        self.offset = offset if offset is not None else (find_run_start(self.path) if find_start else 0)
        self.remainder = b""
        self.inode: int | None = None
        self.bytes_read = 0
        self.download = _DownloadWatch(_repo_blobs(model, hf_cache), expected_bytes)
        self.download_check_s = download_check_s
        self.model = model
        self.size_lookup = size_lookup  # asked once, in a background thread, when a download is seen
        self._lookup_started = False

    @property
    def snapshot(self) -> Snapshot:
        return self.parser.snap

    def mark_ready(self) -> Snapshot:
        """Read what is left of the log, then mark the engine ready (the caller saw /health answer)."""
        self.poll()
        self.parser.mark_ready()
        return self.snapshot

    def feed(self, data: bytes, final: bool = False) -> None:
        """Parse appended bytes: complete lines once; the unterminated tail as a partial (tqdm bars)."""
        buf = self.remainder + data
        parts = _SPLIT.split(buf)
        tail = parts.pop()  # after the last separator: incomplete
        for part in parts:
            if part:
                self.parser.feed_line(part.decode("utf-8", "replace"))
        if final:
            if tail:
                self.parser.feed_line(tail.decode("utf-8", "replace"))
            self.remainder = b""
            return
        if tail:
            self.parser.feed_line(tail.decode("utf-8", "replace"), partial=True)
        self.remainder = tail[-_MAX_REMAINDER:]

    def poll(self) -> Snapshot:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return self.snapshot
        try:
            st = os.fstat(fd)
            if self.inode is not None and st.st_ino != self.inode:
                self.offset, self.remainder = 0, b""  # replaced (rotated): read the new file from its start
            elif st.st_size < self.offset:
                self.offset, self.remainder = 0, b""  # truncated
            self.inode = st.st_ino
            if st.st_size > self.offset:
                os.lseek(fd, self.offset, os.SEEK_SET)
                want = st.st_size - self.offset
                chunks = []
                while want > 0:
                    chunk = os.read(fd, min(want, 1 << 20))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    want -= len(chunk)
                data = b"".join(chunks)
                self.offset += len(data)
                self.bytes_read += len(data)
                self.feed(data)
        finally:
            os.close(fd)
        self._check_download()
        return self.snapshot

    def _check_download(self) -> None:
        p = self.parser
        snap = p.snap
        if not p.load_started or p.download_done or p.shards_seen:
            return
        if snap.stage not in ("resolving", "downloading", "loading_weights"):
            return
        now = self.clock()
        if now - self.download.last_check < self.download_check_s:
            return
        self.download.last_check = now
        got = self.download.measure()
        if got is None:
            return
        size, incomplete = got
        if not incomplete:
            return
        self.download.seen_incomplete = True
        if self.download.expected_bytes is None and self.size_lookup and self.model and not self._lookup_started:
            self._lookup_started = True
            threading.Thread(target=self._lookup, daemon=True, name="sage-size-lookup").start()
        if p.enter_downloading():
            expected = self.download.expected_bytes
            snap.facts["downloaded_bytes"] = size
            if expected:
                snap.progress = min(1.0, size / expected)
                snap.detail = f"{_gib(size)} of {_gib(expected)}"
            else:
                snap.progress = None
                snap.detail = f"{_gib(size)} so far"


    def _lookup(self) -> None:
        try:
            size = self.size_lookup(self.model) if self.size_lookup and self.model else None
        except Exception:
            size = None
        if size:
            self.download.expected_bytes = size


def _gib(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _repo_blobs(model: str | None, hf_cache: Path | None) -> Path | None:
    if not model or model.startswith(("/", ".", "~")) or model.count("/") != 1:
        return None
    from sage_llm.core.paths import repo_dir

    return repo_dir(model, hf_cache) / "blobs"


def find_run_start(path: Path, max_scan: int = 8 * 1024 * 1024, block: int = 256 * 1024) -> int:
    """Offset just after the last `===== sage llm start` header (scanning back at most `max_scan` bytes)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            pos, carry = end, b""
            while pos > 0 and end - pos < max_scan:
                step = min(block, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + carry
                i = data.rfind(START_MARKER)
                if i >= 0 and (i == 0 or data[i - 1:i] == b"\n"):
                    nl = data.find(b"\n", i)
                    return pos + (nl + 1 if nl >= 0 else len(data))
                carry = data[: len(START_MARKER)]
            return 0 if end <= max_scan else end - max_scan
    except OSError:
        return 0


def engine_dtype(path: str | Path, max_bytes: int = 1024 * 1024) -> str | None:
    """The dtype vLLM says its engine runs in ("float32", "bfloat16", ...), from the first `Initializing a V1 LLM
    engine` line of the run that last started in `path` (read at most `max_bytes` into the run); None before it."""
    try:
        with open(path, "rb") as fh:
            fh.seek(find_run_start(Path(path)))
            data = fh.read(max_bytes).decode("utf-8", "replace")
    except OSError:
        return None
    for line in data.splitlines():
        if "Initializing a V1 LLM engine" in line:
            m = _ENGINE_DTYPE.search(line)
            if m:
                return m.group(1)
    return None


def snapshot_of(path: str | Path, model: str | None = None) -> Snapshot:
    """One-shot: the stage of the run that last started in `path` (used by `status`)."""
    lp = LoadProgress(path, model=model, download_check_s=0.0)
    lp.poll()
    return lp.snapshot
