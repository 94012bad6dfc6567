"""The gateway's exception tree and its OpenAI-style error bodies.

    GatewayError (SwitchyardError)         status, type, code -> {"error": {"message","type","code"}}
     +-- BadRequest            400          malformed JSON, missing or mistyped fields
     +-- Unauthorized          401          missing or wrong client key
     +-- Forbidden             403          admin API without the admin key
     +-- UnknownModel          404          lists the names that are served
     +-- NotFound              404          other unknown things (routes, upstreams, adapters)
     +-- Conflict              409          duplicate adapter name, upstream still routed
     +-- BodyTooLarge          413
     +-- AdapterRejected       422          an adapter folder failed the checks before vLLM saw it
     +-- UpstreamUnavailable   503          refused / restarting / marked down; carries Retry-After
     +-- UpstreamTimeout       504

The app turns each into a JSON body in one place (`gateway.app`); nothing else formats errors.
"""

from __future__ import annotations

import json

from switchyard.errors import SwitchyardError


class GatewayError(SwitchyardError):
    status = 500
    type = "internal_error"
    code: str | None = None

    def body(self) -> dict:
        return error_body(self.one_line(), self.type, self.code)

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(GatewayError):
    status, type, code = 403, "permission_error", "admin_key_required"


class NotFound(GatewayError):
    status, type, code = 404, "not_found_error", "not_found"


class UnknownModel(NotFound):
    code = "model_not_found"

    def __init__(self, name: object, available: tuple[str, ...]) -> None:
        listed = ", ".join(available) if available else "none"
        super().__init__(f"the model {name!r} does not exist", f"available models: {listed}")
        self.available = available


class Conflict(GatewayError):
    status, type, code = 409, "conflict_error", "conflict"


class BodyTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class AdapterRejected(GatewayError):
    status, type, code = 422, "invalid_request_error", "adapter_rejected"


class UpstreamUnavailable(GatewayError):
    status, type, code = 503, "upstream_unavailable", "upstream_unavailable"

    def __init__(self, problem: str, hint: str = "", retry_after_s: int = 2) -> None:
        super().__init__(problem, hint)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "upstream_timeout", "upstream_timeout"


def error_body(message: str, type_: str, code: str | int | None) -> dict:
    """The OpenAI error shape; `param` is always present (null) because the official client reads it."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def sse_error_event(message: str, type_: str = "upstream_error", code: str | int | None = "upstream_error") -> bytes:
    """A terminal server-sent event: the official client raises on a `data:` object with an `error` key,
    so a stream that broke upstream never looks complete (no `[DONE]` follows)."""
    return b"data: " + json.dumps(error_body(message, type_, code)).encode() + b"\n\n"
