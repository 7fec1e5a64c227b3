"""Admin operations shared by both front ends: authenticated weight reloads."""

from __future__ import annotations

import hmac

import grpc


class ReloadRefused(Exception):
    """A reload the server will not do: reloads disabled, or a wrong token."""

    def __init__(self, message: str, *, http_status: int, grpc_code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code


def check_admin(authorization: str | None, admin_token: str | None) -> None:
    """Accept ``Authorization: Bearer <admin_token>``; raise ReloadRefused otherwise."""
    if not admin_token:
        raise ReloadRefused(
            "weight reload is disabled: start the server with --admin-token",
            http_status=403,
            grpc_code=grpc.StatusCode.PERMISSION_DENIED,
        )
    scheme, _, token = (authorization or "").partition(" ")
    # Constant-time comparison: the token guards replacing the served model.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise ReloadRefused(
            "missing or wrong admin token (Authorization: Bearer <token>)",
            http_status=401,
            grpc_code=grpc.StatusCode.UNAUTHENTICATED,
        )
