"""A canned OpenAI-compatible streaming upstream for fast client/runner tests (not an engine).

It streams `max_tokens` one-token chunks after `ttft_s`, `itl_s` apart, then a usage chunk and
[DONE], through an httpx transport, so the client's timing code runs against real delays.
"""

from __future__ import annotations

import asyncio
import json

import httpx


class FakeOpenAI:
    def __init__(self, models=("a", "b"), *, ttft_s=0.01, itl_s=0.002, delays=None, prompt_tokens=None,
                 send_usage=True, fail_model=None, api_key=None, role_chunk=False):
        self.models = list(models)
        self.ttft_s, self.itl_s = ttft_s, itl_s
        self.delays = delays or {}  # model -> (ttft_s, itl_s)
        self.prompt_tokens = prompt_tokens
        self.send_usage = send_usage
        self.fail_model = fail_model
        self.api_key = api_key
        self.role_chunk = role_chunk
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return httpx.Response(401, json={"error": {"message": "bad key"}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in self.models]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["model"] == self.fail_model:
            return httpx.Response(500, json={"error": {"message": "engine exploded"}})
        if body["model"] not in self.models:
            return httpx.Response(404, json={"error": {"message": f"model {body['model']} not found"}})
        chat = request.url.path.endswith("/chat/completions")
        text = body["messages"][0]["content"] if chat else body["prompt"]
        prompt_tokens = self.prompt_tokens or len(text.split())
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=self._stream(body, chat, prompt_tokens))

    async def _stream(self, body, chat, prompt_tokens):
        ttft, itl = self.delays.get(body["model"], (self.ttft_s, self.itl_s))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        counted = True
        try:
            if chat and self.role_chunk:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(ttft)
            n = body["max_tokens"]
            for i in range(n):
                if i:
                    await asyncio.sleep(itl)
                choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                yield _sse({"choices": [choice]})
            if self.send_usage:
                yield _sse({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                     "total_tokens": prompt_tokens + n}})
            self.in_flight -= 1  # before [DONE]: a client may stop reading there
            counted = False
            yield b"data: [DONE]\n\n"
        finally:
            if counted:
                self.in_flight -= 1


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
