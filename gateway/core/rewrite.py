"""Request and response rewriting between the stable name clients use and the engine's own name.

Requests are small, so they are parsed once (the gateway must read `model` and `stream` anyway) and
re-serialized only when something changes. Responses are not re-serialized: the `"model":"<name>"`
pair is replaced in the bytes. That is exact for JSON: inside a string value every `"` is escaped,
so an unescaped `"model":"x"` can only be a key/value pair, never generated text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from gateway.core.errors import BadRequest

Kind = Literal["chat", "completions"]

# hop-by-hop headers (RFC 9110 7.6.1) and ones the gateway sets itself or must not forward:
# the client's key is the gateway's business, and the upstream must not compress what we rewrite
_DROP_REQUEST = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "authorization", "cookie", "accept-encoding", "expect",
})
_KEEP_RESPONSE = frozenset({"content-type", "x-request-id"})


@dataclass(frozen=True)
class CompletionRequest:
    """A parsed client request. `client_wants_usage`: the client itself asked for the usage chunk."""

    kind: Kind
    model: str
    stream: bool
    client_wants_usage: bool
    body: dict[str, Any]


def parse_request(raw: bytes, kind: Kind) -> CompletionRequest:
    """Check only what routing needs; everything else is the engine's to validate (and its 400s
    pass through). Raises BadRequest naming the field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", "send a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", f"got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string", "GET /v1/models lists the names")
    if kind == "chat":
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise BadRequest("'messages' is required and must be a non-empty array", "see the chat completions API")
    elif "prompt" not in body or body["prompt"] is None:
        raise BadRequest("'prompt' is required", "see the completions API")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", f"got {stream!r}")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", f"got {opts!r}")
    wants_usage = bool(opts and opts.get("include_usage"))
    return CompletionRequest(kind, model, stream, wants_usage, body)


def upstream_body(req: CompletionRequest, upstream_model: str, raw: bytes) -> bytes:
    """The body for the engine: `model` renamed, and for streams `stream_options.include_usage` set
    (token metrics need it; `strip_usage` removes it again if the client did not ask). Returns `raw`
    untouched when nothing changes."""
    add_usage = req.stream and not req.client_wants_usage
    if upstream_model == req.model and not add_usage:
        return raw
    body = dict(req.body)
    body["model"] = upstream_model
    if add_usage:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def model_renamer(upstream_model: str, stable: str):
    """A bytes -> bytes function replacing the engine's model name with the stable one."""
    if upstream_model == stable:
        return lambda data: data
    up = json.dumps(upstream_model, ensure_ascii=False).encode()
    st = json.dumps(stable, ensure_ascii=False).encode()
    pairs = [(b'"model":' + up, b'"model":' + st), (b'"model": ' + up, b'"model": ' + st)]

    def rename(data: bytes) -> bytes:
        for old, new in pairs:
            data = data.replace(old, new)
        return data

    return rename


def usage_of(body: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from a JSON response body, or None."""
    try:
        usage = json.loads(body).get("usage")
        return int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def forward_request_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """End-to-end client headers for the engine: hop-by-hop ones (and any the client's `Connection`
    header names) dropped, as are the client's key, cookies and encodings."""
    named: set[str] = set()
    for k, v in headers:
        if k.lower() == "connection":
            named |= {t.strip().lower() for t in v.split(",") if t.strip()}
    out = {k: v for k, v in headers if k.lower() not in _DROP_REQUEST and k.lower() not in named}
    out["content-type"] = "application/json"
    out["accept-encoding"] = "identity"  # bytes are rewritten in flight: never compressed
    return out


def response_headers(headers: list[tuple[str, str]], mode: str, upstream: str) -> dict[str, str]:
    out = {k: v for k, v in headers if k.lower() in _KEEP_RESPONSE}
    out["x-switchyard-mode"] = mode
    out["x-switchyard-upstream"] = upstream
    return out
