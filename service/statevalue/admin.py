"""Access checks shared by both front ends: the admin token (weight reloads) and the
optional API token (Estimate)."""

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


class Unauthenticated(Exception):
    """An Estimate without the API token the server requires."""


def check_api_token(authorization: str | None, api_token: str | None) -> None:
    """With an API token set, require ``Authorization: Bearer <api_token>``."""
    if api_token is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_token.encode()):
        raise Unauthenticated("missing or wrong API token (Authorization: Bearer <token>)")
