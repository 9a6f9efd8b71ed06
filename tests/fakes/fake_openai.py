#!/usr/bin/env python3
"""A small OpenAI-compatible "cloud" API for tests and benchmarks (stdlib only), on real sockets.

It checks the bearer key, lists models, answers /v1/chat/completions streamed (SSE with include_usage) or not, and
can misbehave: drop the connection mid-stream, send an error frame mid-stream, answer 500, or be slow per token.

In-process:   api = FakeOpenAI(key="sk-test").start(); api.base_url; api.requests; api.stop()
As a script:  python tests/fakes/fake_openai.py --port 19310 --key sk-test [--reply TEXT] [--tokens N] [--delay S]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(self, key: str = "sk-test", port: int = 0, models: tuple[str, ...] = ("cloud-model",),
                 reply: str = "Hello from the cloud.", host: str = "127.0.0.1") -> None:
        self.key = key
        self.models = list(models)
        self.reply = reply
        self.tokens: list[str] | None = None  # explicit pieces (overrides `reply`)
        self.delay_s = 0.0  # between pieces
        self.fail_after: int | None = None  # drop the connection after this many pieces
        self.error_after: int | None = None  # send an error frame after this many pieces
        self.status: int | None = None  # answer every chat request with this status
        self.gzip = False  # compress JSON answers for clients that accept gzip (as api.openai.com does)
        self.headers: dict[str, str] = {}  # extra headers on every answer (e.g. Retry-After)
        self.content_type = "application/json"  # of JSON answers (a hostile upstream may say text/html)
        self.max_model_len = 4096
        self.requests: list[dict[str, Any]] = []
        self.auth_seen: list[str | None] = []  # the Authorization header of every request, in order
        self.disconnects = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # dropped on purpose
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def pieces(self) -> list[str]:
        if self.tokens is not None:
            return list(self.tokens)
        words = self.reply.split(" ")
        return [w + " " for w in words[:-1]] + [words[-1]]

    def start(self) -> FakeOpenAI:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(api: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            pass

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass  # the connection was dropped on purpose (fail_after)

        def _json(self, code: int, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("content-type", api.content_type)
            if api.gzip and "gzip" in self.headers.get("accept-encoding", ""):
                import gzip

                body = gzip.compress(body)
                self.send_header("content-encoding", "gzip")
            for name, value in api.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _auth(self) -> bool:
            with api.lock:
                api.auth_seen.append(self.headers.get("authorization"))
            if self.headers.get("authorization") == f"Bearer {api.key}":
                return True
            self._json(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                       "code": "invalid_api_key"}})
            return False

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self._json(404, {"error": {"message": "not found"}})
                return
            if not self._auth():
                return
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake-cloud"}
                                                        for m in api.models]})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            if not self._auth():
                return
            if self.path != "/v1/chat/completions":
                self._json(404, {"error": {"message": "not found"}})
                return
            req = json.loads(raw or b"{}")
            with api.lock:
                api.requests.append(req)
            if api.status is not None:
                self._json(api.status, {"error": {"message": f"fake failure {api.status}", "type": "server_error"}})
                return
            model = req.get("model") or api.models[0]
            if model not in api.models:
                self._json(404, {"error": {"message": f"The model `{model}` does not exist", "type":
                                           "invalid_request_error", "code": "model_not_found"}})
                return
            prompt_tokens = sum(len(str(m.get("content", "")).split()) + 3 for m in req.get("messages", []))
            if prompt_tokens > api.max_model_len:
                self._json(400, {"error": {"message": f"This model's maximum context length is {api.max_model_len}"
                                           f" tokens. However, your messages resulted in {prompt_tokens} tokens.",
                                           "type": "invalid_request_error", "code": "context_length_exceeded"}})
                return
            pieces = api.pieces()
            if req.get("max_tokens"):
                pieces = pieces[: int(req["max_tokens"])]
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                     "total_tokens": prompt_tokens + len(pieces)}
            base = {"id": "chatcmpl-cloud", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model}
            if not req.get("stream"):
                self._json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                     "finish_reason": "stop"}]})
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()

            def frame(obj: Any) -> None:
                data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                frame({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
                for n, piece in enumerate(pieces):
                    if api.fail_after is not None and n == api.fail_after:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # drop it: no end chunk, no [DONE]
                        return
                    if api.error_after is not None and n == api.error_after:
                        frame({"error": {"message": "fake engine error mid-stream", "type": "InternalServerError",
                                         "code": 500}})
                        frame("[DONE]")
                        self.wfile.write(b"0\r\n\r\n")
                        return
                    if api.delay_s:
                        time.sleep(api.delay_s)
                    frame({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                frame({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if (req.get("stream_options") or {}).get("include_usage"):
                    frame({**base, "choices": [], "usage": usage})
                frame("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:  # the client went away (cancelled)
                with api.lock:
                    api.disconnects += 1

    return Handler


def markdown_pieces(n: int) -> list[str]:
    """About `n` word-sized pieces of a typical Markdown reply: a heading, paragraphs, a list and a code block, again
    and again."""
    unit: list[str] = ["## ", "Section ", "{k}\n\n"]
    unit += [f"word{i} " if i % 7 else f"**bold{i}** " for i in range(60)] + ["end.\n\n"]
    unit += [p for i in range(4) for p in ("- ", "item ", f"`code{i}` ", "and ", "text\n")] + ["\n"]
    unit += ["```python\n"] + [p for i in range(5) for p in ("def ", f"f{i}", "(x):", " return ", "x\n")]
    unit += ["```\n\n"]
    out: list[str] = []
    k = 0
    while len(out) < n:
        out += [p.replace("{k}", str(k)) for p in unit]
        k += 1
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=19310)
    ap.add_argument("--key", default="sk-test")
    ap.add_argument("--reply", default="Hello from the cloud.")
    ap.add_argument("--model", default="cloud-model")
    ap.add_argument("--tokens", type=int, default=0, help="stream this many 1-word pieces instead of --reply")
    ap.add_argument("--markdown", type=int, default=0, help="stream about this many pieces of Markdown (paragraphs, "
                    "lists, code blocks) instead of --reply")
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    api = FakeOpenAI(key=args.key, port=args.port, models=(args.model,), reply=args.reply)
    if args.tokens:
        api.tokens = [f"w{i} " for i in range(args.tokens)]
    if args.markdown:
        api.tokens = markdown_pieces(args.markdown)
    api.delay_s = args.delay
    print(f"fake cloud API on {api.base_url} (key {args.key})", flush=True)
    try:
        api.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
