"""API-key checks. Keys are compared in constant time (hmac.compare_digest over every configured key,
never stopping early), and never appear in an error message or a log line."""

from __future__ import annotations

import hmac

from gateway.core.errors import Forbidden, Unauthorized


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    """True when `token` equals one of `keys`; the time taken does not depend on which one or where."""
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


def check_client(authorization: str | None, client_keys: tuple[str, ...]) -> None:
    """No keys configured: open. Otherwise a missing or wrong key is Unauthorized (401)."""
    if not client_keys:
        return
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized("no API key provided", "send 'Authorization: Bearer <key>'")
    if not key_matches(token, client_keys):
        raise Unauthorized("incorrect API key provided", "use a key from SWITCHYARD_API_KEYS")


def check_admin(authorization: str | None, admin_key: str | None) -> None:
    """The admin API always needs the admin key: 401 without a key, 403 for any other key (client keys
    included); with no admin key configured the admin API is closed (403)."""
    if not admin_key:
        raise Forbidden("the admin API is disabled", "set SWITCHYARD_ADMIN_KEY to enable it")
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized("the admin API needs the admin key", "send 'Authorization: Bearer <admin key>'")
    if not key_matches(token, (admin_key,)):
        raise Forbidden("this key may not use the admin API", "use the key from SWITCHYARD_ADMIN_KEY")
