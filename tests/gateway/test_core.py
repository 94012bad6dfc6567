"""The pure core: routing tables, key checks, request/response rewriting, SSE framing."""

from __future__ import annotations

import json

import pytest

from gateway.core.auth import bearer_token, check_admin, check_client, key_matches
from gateway.core.errors import BadRequest, Forbidden, Unauthorized, UnknownModel, sse_error_event
from gateway.core.rewrite import (
    forward_request_headers, model_renamer, parse_request, response_headers, upstream_body, usage_of,
)
from gateway.core.routing import Route, RoutingTable
from gateway.core.sse import SSEFramer, plain_events, process_event


# --- routing ---------------------------------------------------------------------------------------
def test_table_is_immutable_and_changes_build_new_tables():
    a = Route("bot", "base", "bot-lora", "adapter")
    t1 = RoutingTable.of([a])
    t2 = t1.with_route(Route("bot", "merged-1", "bot", "merged"))
    assert t1.resolve("bot") is a  # the old table (and requests holding it) unchanged
    assert t2.resolve("bot").mode == "merged"
    t3 = t2.without("bot")
    assert "bot" in t2 and "bot" not in t3 and len(t3) == 0
    with pytest.raises(TypeError):
        t1._routes["x"] = a  # type: ignore[index]


def test_unknown_model_lists_available_names():
    t = RoutingTable.of([Route("a", "u", "a", "base"), Route("b", "u", "b-lora", "adapter")])
    with pytest.raises(UnknownModel) as e:
        t.resolve("zzz")
    assert e.value.status == 404 and "a, b" in e.value.one_line()


def test_route_validates_mode_and_duplicates():
    with pytest.raises(ValueError):
        Route("a", "u", "a", "quantum")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RoutingTable.of([Route("a", "u", "a", "base"), Route("a", "v", "a", "merged")])


# --- auth -------------------------------------------------------------------------------------------
def test_bearer_parsing_and_key_match():
    assert bearer_token("Bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None and bearer_token("Bearer ") is None
    assert key_matches("k2", ("k1", "k2")) and not key_matches("k3", ("k1", "k2")) and not key_matches("k", ())


def test_client_keys_open_when_none_configured_else_401():
    check_client(None, ())
    check_client("Bearer good", ("good",))
    for header in (None, "Bearer bad", "Basic good"):
        with pytest.raises(Unauthorized) as e:
            check_client(header, ("good",))
        assert "good" not in e.value.one_line()  # keys never appear in messages


def test_admin_needs_admin_key():
    check_admin("Bearer adm", "adm")
    with pytest.raises(Unauthorized):
        check_admin(None, "adm")
    with pytest.raises(Forbidden):
        check_admin("Bearer client", "adm")
    with pytest.raises(Forbidden):  # no admin key configured: closed, whatever is sent
        check_admin("Bearer anything", None)


# --- request parsing and rewriting -----------------------------------------------------------------
def test_parse_request_errors_name_the_field():
    cases = [(b"{nope", "not valid JSON"), (b"[1]", "JSON object"), (b'{"messages": [{}]}', "'model'"),
             (b'{"model": "m"}', "'messages'"), (b'{"model": "m", "messages": [], "stream": 1}', "'messages'"),
             (b'{"model": "m", "messages": [{}], "stream": "yes"}', "'stream'")]
    for raw, needle in cases:
        with pytest.raises(BadRequest) as e:
            parse_request(raw, "chat")
        assert needle in e.value.one_line(), raw
    with pytest.raises(BadRequest):
        parse_request(b'{"model": "m"}', "completions")


def test_upstream_body_renames_and_requests_usage_only_when_needed():
    raw = b'{"model": "bot", "messages": [{"role": "user", "content": "hi"}]}'
    req = parse_request(raw, "chat")
    assert upstream_body(req, "bot", raw) is raw  # nothing to change: the client's bytes go as they are
    out = json.loads(upstream_body(req, "bot-lora", raw))
    assert out["model"] == "bot-lora" and "stream_options" not in out
    sraw = b'{"model": "bot", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
    s = parse_request(sraw, "chat")
    assert not s.client_wants_usage
    assert json.loads(upstream_body(s, "bot", sraw))["stream_options"] == {"include_usage": True}
    uraw = b'{"model":"bot","prompt":"x","stream":true,"stream_options":{"include_usage":true}}'
    u = parse_request(uraw, "completions")
    assert u.client_wants_usage and upstream_body(u, "bot", uraw) is uraw


def test_model_renamer_touches_only_the_model_pair():
    rename = model_renamer("bot-lora", "bot")
    body = json.dumps({"model": "bot-lora", "choices": [{"text": '{"model":"bot-lora"}'}]}).encode()
    out = json.loads(rename(body))
    assert out["model"] == "bot" and out["choices"][0]["text"] == '{"model":"bot-lora"}'
    compact = b'{"id":"x","model":"bot-lora","choices":[]}'
    assert json.loads(rename(compact))["model"] == "bot"
    assert model_renamer("same", "same")(compact) is compact


def test_hop_by_hop_and_secret_headers_are_dropped():
    h = forward_request_headers([("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"),
                                 ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("TE", "trailers"),
                                 ("Authorization", "Bearer k"), ("Cookie", "c"), ("X-Request-Id", "r1"),
                                 ("Proxy-Authorization", "p"), ("Host", "gw")])
    assert {k.lower() for k in h} == {"x-request-id", "content-type", "accept-encoding"}
    r = response_headers([("content-type", "text/event-stream"), ("server", "uvicorn"), ("content-length", "9")],
                         "adapter", "base")
    assert r == {"content-type": "text/event-stream", "x-switchyard-mode": "adapter", "x-switchyard-upstream": "base"}


def test_usage_of():
    assert usage_of(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 5}}') == (3, 5)
    assert usage_of(b"not json") is None and usage_of(b"{}") is None


# --- SSE ----------------------------------------------------------------------------------------------
def test_framer_cuts_events_across_arbitrary_reads():
    stream = b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\ndata: [DONE]\n\n'
    for size in (1, 3, 7, len(stream)):
        f = SSEFramer()
        events = [e for i in range(0, len(stream), size) for e in f.feed(stream[i:i + size])]
        assert events == [b'data: {"a":1}\n\n', b'data: {"b":2}\r\n\r\n', b"data: [DONE]\n\n"]
        assert f.pending() == 0
    f = SSEFramer()
    f.feed(b'data: {"partial"')
    assert f.pending() == len(b'data: {"partial"')  # a truncated stream is visible


def test_process_event_strips_the_usage_chunk_the_client_did_not_ask_for():
    rename = model_renamer("up", "stable")
    usage = b'data: {"model":"up","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
    dropped = process_event(usage, rename, strip_usage=True)
    assert dropped.out is None and dropped.usage == (4, 2)
    kept = process_event(usage, rename, strip_usage=False)
    assert json.loads(kept.out[6:])["model"] == "stable" and kept.usage == (4, 2)
    cont = b'data: {"model":"up","choices":[{"text":"x"}],"usage":{"prompt_tokens":4,"completion_tokens":1}}\n\n'
    info = process_event(cont, rename, strip_usage=True)
    assert "usage" not in json.loads(info.out[6:]) and json.loads(info.out[6:])["choices"] == [{"text": "x"}]
    assert process_event(b"data: [DONE]\n\n", rename, True).done
    assert process_event(sse_error_event("boom"), rename, True).error


def test_the_one_step_rewrite_equals_the_per_event_one_or_declines():
    rename = model_renamer("lora-x", "stable")

    def per_event(data: bytes) -> bytes:
        out = [process_event(e, rename, True).out for e in SSEFramer().feed(data)]
        return b"".join(o for o in out if o is not None)

    one = b'data: {"id":"c","model":"lora-x","choices":[{"delta":{"content":"hi"}}]}\n\n'
    two = one + b'data: {"id":"c","model":"lora-x","choices":[{"delta":{"content":"\\"model\\":\\"lora-x\\""}}]}\n\n'
    for data in (one, two, b": keep-alive\n\n" + one):
        assert plain_events(data, rename) == per_event(data) and b"lora-x" not in plain_events(data, rename)[:40]
    usage = b'data: {"id":"c","model":"lora-x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    for data in (one + b"data: [DONE]\n\n", usage, one[:-1], one.replace(b"\n\n", b"\r\n\r\n"), one + b"data: {"):
        assert plain_events(data, rename) is None  # [DONE], usage, a partial event, CRLF framing: per event
