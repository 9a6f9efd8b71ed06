"""Engine events for GET /api/events (Server-Sent Events): loading stages with progress, ready, failed, stopped.

Publishers call `publish` from the event loop (or `publish_threadsafe` from a worker thread); every subscriber has
its own bounded queue, and a subscriber too slow to keep up loses its oldest events, never blocks the gateway.
Events never go into a model's output stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any


class EventBus:
    def __init__(self, history: int = 200, queue_size: int = 1000) -> None:
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=history)
        self.queue_size = queue_size
        self.loop: asyncio.AbstractEventLoop | None = None
        self.seq = 0
        self.listeners: list[Any] = []  # callables(event), e.g. `gateway run` printing one line per event

    def publish(self, kind: str, **data: Any) -> dict[str, Any]:
        self.seq += 1
        event = {"id": self.seq, "event": kind, "time": round(time.time(), 3), **data}
        self.recent.append(event)
        for q in list(self.subscribers):
            if q.full():
                q.get_nowait()
            q.put_nowait(event)
        for fn in self.listeners:
            try:
                fn(event)
            except Exception:  # a printing listener must never break the gateway
                self.listeners.remove(fn)
        return event

    def publish_threadsafe(self, kind: str, **data: Any) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: self.publish(kind, **data))

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.queue_size)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.discard(q)


def describe(event: dict[str, Any]) -> str | None:
    """One human line for an event (None for the noisy ones: loading progress ticks)."""
    kind, model = event.get("event"), event.get("model")
    if kind == "loading":
        return f"loading {model}" if event.get("stage") == "launching" else None
    if kind == "ready":
        took = f" in {event['load_s']:.1f} s" if event.get("load_s") is not None else ""
        return f"{model} ready{took} (engine {event.get('engine')})" + (" (woken)" if event.get("woke") else "")
    if kind == "failed":
        return f"{model}: {event.get('error')}"
    if kind in ("stopping", "sleeping", "waking", "adopted"):
        return f"{kind} {model} (engine {event.get('engine')})" + (f": {event['reason']}" if event.get("reason")
                                                                   else "")
    if kind == "stopped":
        return f"stopped {model} (engine {event.get('engine')}, {event.get('reason')})"
    if kind == "warning":
        return f"warning: {event.get('error')}"
    return None


def sse_frame(event: dict[str, Any]) -> bytes:
    return f"id: {event['id']}\nevent: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()
