"""A canned OpenAI-style upstream that streams fixed chunks: for fast proxy unit tests and for
isolating the gateway's own cost in the overhead benchmark. Never a stand-in for vLLM in
integration tests.

A request steers it through an optional `"canned"` object in its body (the gateway passes it on):
    chunks (8)  chunk_delay_s (0)  status (200; others answer an OpenAI error body)
    fail_after (drop the connection after N chunks)  hang_after (stop sending after N chunks)
    truncate_after (end the stream cleanly after N chunks, without [DONE])
    end_delay_s (end the body that long after [DONE], in its own write, as vLLM does)
It records every request it saw (`records`) and every stream its client abandoned (`aborted`).

Run alone: `python -m gateway.canned --port 9100`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass
class Record:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client: tuple[str, int] | None = None  # the caller's address: one port per connection


class _Drop(Exception):
    """Raised mid-response: the server closes the connection without finishing the body."""


@dataclass
class CannedUpstream:
    model: str = "canned-base"
    records: list[Record] = field(default_factory=list)
    aborted: int = 0
    completed: int = 0
    loaded: set[str] = field(default_factory=set)
    record: bool = True

    def served(self) -> list[Record]:
        """Records of everything but the gateway's health probes."""
        return [r for r in self.records if "x-switchyard-probe" not in r.headers]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await serve_lifespan(receive, send)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if self.record:
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.records.append(Record(method, path, headers, body, tuple(scope.get("client") or ()) or None))
        if path == "/v1/models":
            data = [{"id": self.model, "object": "model", "parent": None}]
            data += [{"id": n, "object": "model", "parent": self.model} for n in sorted(self.loaded)]
            return await _answer(send, 200, {"object": "list", "data": data})
        if path == "/health":
            return await _answer(send, 200, {})
        if path == "/v1/load_lora_adapter":
            req = json.loads(body)
            if req["lora_name"] in self.loaded:
                return await _answer(send, 400, _err(f"The lora adapter '{req['lora_name']}' has already been loaded."))
            await asyncio.sleep(0.05)
            self.loaded.add(req["lora_name"])
            return await _answer(send, 200, None, b"Success")
        if path == "/v1/unload_lora_adapter":
            name = json.loads(body)["lora_name"]
            if name not in self.loaded:
                return await _answer(send, 404, _err(f"The lora adapter '{name}' cannot be found."))
            self.loaded.discard(name)
            return await _answer(send, 200, None, b"Success")
        if path not in ("/v1/chat/completions", "/v1/completions") or method != "POST":
            return await _answer(send, 404, _err(f"{path} not found"))
        req = json.loads(body)
        opts = req.get("canned") or {}
        status = int(opts.get("status", 200))
        if status != 200:
            return await _answer(send, status, _err(f"canned error {status}"))
        chat = path == "/v1/chat/completions"
        if not req.get("stream"):
            delay = float(opts.get("delay_s", 0))
            if delay and await _disconnected_within(receive, delay):
                self.aborted += 1
                return
            return await _answer(send, 200, _whole(req["model"], chat, int(opts.get("chunks", 8))))
        await self._stream(req, chat, opts, receive, send)

    async def _stream(self, req, chat, opts, receive, send) -> None:
        n, delay = int(opts.get("chunks", 8)), float(opts.get("chunk_delay_s", 0))
        fail_after, hang_after = opts.get("fail_after"), opts.get("hang_after")
        truncate_after = opts.get("truncate_after")
        gone = asyncio.Event()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            for i in range(n):
                if i == fail_after:
                    raise _Drop()
                if i == truncate_after:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                if i == hang_after:
                    await gone.wait()
                if delay:
                    await asyncio.sleep(delay)  # not wait_for(gone.wait()): that costs a task per chunk
                if gone.is_set():
                    self.aborted += 1
                    return
                await send({"type": "http.response.body", "body": _chunk(req["model"], chat, i), "more_body": True})
            tail = b""
            if (req.get("stream_options") or {}).get("include_usage"):
                tail += b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                                                "model": req["model"], "choices": [],
                                                "usage": {"prompt_tokens": 3, "completion_tokens": n,
                                                          "total_tokens": 3 + n}}, separators=(",", ":")).encode() + b"\n\n"
            end_delay = float(opts.get("end_delay_s", 0))  # vLLM ends the chunked body in a later write
            await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": bool(end_delay)})
            if end_delay:
                await asyncio.sleep(end_delay)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.completed += 1
        finally:
            watcher.cancel()


async def serve_lifespan(receive, send) -> None:
    """An ASGI lifespan scope for an app with nothing to start or stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def _disconnected_within(receive, seconds: float) -> bool:
    async def gone():
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(gone(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


def _err(message: str) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}


def _chunk(model: str, chat: bool, i: int) -> bytes:
    if chat:
        obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None, "finish_reason": None}]}
    else:
        obj = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
               "choices": [{"index": 0, "text": f"tok{i} ", "logprobs": None, "finish_reason": None}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _whole(model: str, chat: bool, n: int) -> dict:
    text = "".join(f"tok{i} " for i in range(n))
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"} if chat
              else {"index": 0, "text": text, "finish_reason": "length"})
    return {"id": "c1", "object": "chat.completion" if chat else "text_completion", "created": 1, "model": model,
            "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}}


async def _answer(send, status: int, obj, raw: bytes | None = None) -> None:
    body = raw if raw is not None else json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1 in a daemon thread; `with` starts and stops it."""

    def __init__(self, app, port: int, host: str = "127.0.0.1", log_level: str = "warning", **uvicorn_kwargs) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                lifespan="on", **uvicorn_kwargs)
        self.server = uvicorn.Server(config)
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def main() -> None:
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="canned-base")
    a = p.parse_args()
    uvicorn.run(CannedUpstream(model=a.model, record=False), host="127.0.0.1", port=a.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", lifespan="off")


if __name__ == "__main__":
    main()
