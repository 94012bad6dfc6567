"""An async streaming OpenAI client that times every chunk (the network edge of the load tester).

One `httpx.AsyncClient` per run; the transport is a constructor argument so tests can stream from
a fake upstream. Every request has a connect timeout, a gap timeout (between chunks) and an overall
deadline; failures become records with `error` set, never exceptions, so one bad request cannot
stop a run. `preflight` is the exception: it raises TargetError so a bad URL, key or model name
fails in seconds with one line.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable, Sequence

import httpx

from loadtests.errors import TargetError
from loadtests.records import RequestRecord, Target
from loadtests.workload import synthetic_prompts

PROBE_WORDS = 32  # the pre-flight prompt's length, to learn the target's tokens per word
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def normalize_url(url: str) -> str:
    """The server root: `http://h:8000/v1/` and `http://h:8000` both give `http://h:8000`."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise TargetError(f"--url {url!r} is not an http(s) URL", "pass e.g. http://127.0.0.1:8000")
    return url


class StreamingClient:
    """Sends streaming completions and records when each chunk arrived.

    `clock()` gives seconds since the run started (monotonic); all record times use it.
    """

    def __init__(self, *, api_key: str | None = None, endpoint: str = "completions",
                 timeout_s: float = 300.0, connect_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.perf_counter,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 1024) -> None:
        if endpoint not in ENDPOINTS:
            raise TargetError(f"--endpoint {endpoint!r} is unknown", f"use one of {', '.join(ENDPOINTS)}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.clock = clock
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                # below the servers' keep-alive (uvicorn and vLLM: 5 s unless raised): a
                                # request sent on a connection the server is closing fails though nothing is wrong
                                keepalive_expiry=4.0),
        )

    async def __aenter__(self) -> "StreamingClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def body(self, model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
        body: dict = {"model": model, "max_tokens": max_tokens, "stream": True,
                      "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension: fixed output lengths
        return body

    async def send(self, target: Target, prompt: str, *, max_tokens: int, ignore_eos: bool,
                   level: str, batch: int, index: int, warmup: bool) -> RequestRecord:
        """One streamed request, as a record; never raises except on cancellation."""
        start = self.clock()
        times: list[float] = []
        usage_out = usage_in = None
        status = None
        error = None
        try:
            async with asyncio.timeout(self.timeout_s):
                url = target.url + ENDPOINTS[self.endpoint]
                body = self.body(target.model, prompt, max_tokens, ignore_eos)
                async with self._http.stream("POST", url, json=body) as resp:
                    status = resp.status_code
                    if status != 200:
                        error = f"HTTP {status}: {_error_message(await resp.aread())}"
                    else:
                        async for line in resp.aiter_lines():
                            if not line.startswith("data:"):
                                continue  # blank separators and ": ping" comments
                            data = line[len("data:"):].strip()
                            if data == "[DONE]":
                                break
                            now = self.clock()
                            chunk = json.loads(data)
                            if "error" in chunk:
                                error = f"stream error: {_error_message(data.encode())}"
                                break
                            if _carries_token(chunk, self.endpoint):
                                times.append(now)
                            if chunk.get("usage"):
                                usage_out = chunk["usage"].get("completion_tokens")
                                usage_in = chunk["usage"].get("prompt_tokens")
        except TimeoutError:
            error = f"timed out after {self.timeout_s:g} s"
        except httpx.TimeoutException as exc:
            error = f"timed out ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except (json.JSONDecodeError, AttributeError, TypeError) as exc:
            error = f"malformed stream: {exc}"
        end = self.clock()
        if error is None and not times:
            error = "no tokens received"
        return RequestRecord(
            target=target.label, level=level, batch=batch, index=index, warmup=warmup,
            start=start, end=end, first_token=times[0] if times else None, token_times=tuple(times),
            prompt_tokens=usage_in, output_tokens=usage_out if usage_out is not None else len(times),
            output_tokens_from="usage" if usage_out is not None else "chunks", status=status, error=error,
        )

    async def served_models(self, url: str) -> list[str]:
        """The ids `GET /v1/models` lists at `url`; TargetError when that fails."""
        try:
            resp = await self._http.get(f"{url}/v1/models", timeout=httpx.Timeout(15.0, connect=5.0))
        except httpx.ConnectError as exc:
            raise TargetError(f"cannot connect to {url} ({exc})", "check --url and that the server is running") from None
        except httpx.TimeoutException:
            raise TargetError(f"{url} did not answer GET /v1/models within 15 s", "check --url; is the server overloaded?") from None
        except httpx.HTTPError as exc:
            raise TargetError(f"GET {url}/v1/models failed: {exc}", "check --url") from None
        if resp.status_code in (401, 403):
            raise TargetError(f"{url} refused the request (HTTP {resp.status_code})", "pass a valid --api-key")
        if resp.status_code != 200:
            raise TargetError(f"GET {url}/v1/models returned HTTP {resp.status_code}",
                              "pass the root of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
        try:
            return [m["id"] for m in resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise TargetError(f"{url}/v1/models did not return an OpenAI model list",
                              "pass the root of an OpenAI-compatible server") from None


async def preflight(client: StreamingClient, targets: Sequence[Target], *, seed: int = 0,
                    probe_timeout_s: float = 60.0) -> dict[str, float]:
    """Check every target before the run: its model is listed and it generates one token.

    Returns each target's prompt tokens per synthetic word (for sizing `--input-len` prompts).
    Raises TargetError naming the target and what to fix.
    """
    served: dict[str, list[str]] = {}
    for t in targets:
        if t.url not in served:
            served[t.url] = await client.served_models(t.url)
        if t.model not in served[t.url]:
            raise TargetError(f"model {t.model!r} is not served at {t.url}",
                              f"served there: {', '.join(served[t.url]) or 'nothing'}")
    ratios = {}
    probe = synthetic_prompts(1, PROBE_WORDS, seed)[0]
    for t in targets:
        try:
            async with asyncio.timeout(probe_timeout_s):
                rec = await client.send(t, probe, max_tokens=1, ignore_eos=True, level="preflight",
                                        batch=-1, index=0, warmup=True)
        except TimeoutError:
            raise TargetError(f"{t.model!r} at {t.url} did not generate 1 token within {probe_timeout_s:g} s",
                              "is the engine overloaded or still starting?") from None
        if not rec.success:
            raise TargetError(f"a 1-token test request to {t.model!r} at {t.url} failed: {rec.error}",
                              "check that the model generates, e.g. with curl")
        ratios[t.label] = (rec.prompt_tokens or PROBE_WORDS) / PROBE_WORDS
    return ratios


def _carries_token(chunk: dict, endpoint: str) -> bool:
    """A chunk with a choice counts as (at least) one token, as in vLLM's benchmark; chat's opening
    role-only delta does not, so TTFT is the first generated text."""
    choices = chunk.get("choices")
    if not choices:
        return False
    if endpoint == "chat":
        delta = choices[0].get("delta") or {}
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))
    return True


def _error_message(raw: bytes) -> str:
    """The `message` of an OpenAI error body, or the first 200 bytes of whatever came back."""
    text = raw.decode(errors="replace")
    try:
        obj = json.loads(text)
        err = obj.get("error", obj)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return text.strip()[:200]
