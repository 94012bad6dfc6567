"""FastAPI dependencies for the two kinds of key. `require_admin` is exported for `deploy`'s own
admin routes, mounted with `create_app(..., extra_routers=...)`, so every admin route shares one key."""

from __future__ import annotations

from fastapi import Request

from gateway.core.auth import check_admin, check_client


def require_client(request: Request) -> None:
    """401 unless the request carries a client key (when any are configured)."""
    check_client(request.headers.get("authorization"), request.app.state.gateway.settings.client_keys())


def require_admin(request: Request) -> None:
    """401 without a key, 403 for any key but the admin key (client keys included)."""
    check_admin(request.headers.get("authorization"), request.app.state.gateway.settings.admin_secret())


def gateway_of(request: Request):
    """The `Gateway` serving this app (a dependency for admin routes)."""
    return request.app.state.gateway
