"""Server-sent events, cut at event boundaries and rewritten one event at a time.

Memory bound: `SSEFramer` holds at most one incomplete event (the bytes after the last blank line);
`pending()` says how many, and a stream that ends with bytes pending was truncated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_DONE = b"data: [DONE]"


class SSEFramer:
    """Feed raw upstream bytes; get back complete events, each ending in its blank line."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data
        events = []
        while True:
            i = buf.find(b"\n\n")
            j = buf.find(b"\r\n\r\n")
            if i < 0 and j < 0:
                break
            if j >= 0 and (i < 0 or j < i):
                cut = j + 4
            else:
                cut = i + 2
            events.append(buf[:cut])
            buf = buf[cut:]
        self._buf = buf
        return events

    def pending(self) -> int:
        return len(self._buf)


def plain_events(data: bytes, rename) -> bytes | None:
    """The common case in one step: `data` is whole events (LF-framed) with no usage and no `[DONE]`,
    so the rewrite is the renamed bytes, identical to framing and processing each event; None when
    the per-event path is needed. (Most engine reads are one token's event: this is the hot path.)"""
    if data.endswith(b"\n\n") and b"\r" not in data and b'"usage"' not in data and b"[DONE]" not in data:
        return rename(data)
    return None


@dataclass(frozen=True)
class EventInfo:
    """What the proxy learns from one event: `out` is None when the event is dropped."""

    out: bytes | None
    usage: tuple[int, int] | None = None
    done: bool = False
    error: bool = False


def process_event(event: bytes, rename, strip_usage: bool) -> EventInfo:
    """Rename the model; read usage from the usage chunk (the only one with `"usage":{`), dropping
    it when the client did not ask for it. `[DONE]` and error events are flagged."""
    if event.startswith(_DONE):
        return EventInfo(event, done=True)
    if b'"usage":{' not in event and b'"usage": {' not in event:
        return EventInfo(rename(event), error=event.startswith(b'data: {"error"'))
    payload = _data_of(event)
    try:
        obj = json.loads(payload)
        usage = obj["usage"]
        tokens = (int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0))
    except (ValueError, TypeError, KeyError):
        return EventInfo(rename(event))
    if not strip_usage:
        return EventInfo(rename(event), usage=tokens)
    if not obj.get("choices"):
        return EventInfo(None, usage=tokens)
    obj.pop("usage", None)  # continuous usage stats on a content chunk: keep the content
    return EventInfo(rename(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"), usage=tokens)


def _data_of(event: bytes) -> bytes:
    lines = [ln[5:].lstrip() for ln in event.splitlines() if ln.startswith(b"data:")]
    return b"\n".join(lines)
