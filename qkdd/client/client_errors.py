"""The key-service client's errors: one root, `ClientError`, and what an application tells
apart (the service refused, could not be reached, or answered something that is not the API).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BadResponse", "ClientError", "KeyServiceClientError", "KeyServiceUnreachable"]


class ClientError(Exception):
    """Base of the key-service client's errors."""


class KeyServiceClientError(ClientError):
    """The key service answered with an ETSI Error object (status other than 200)."""

    def __init__(self, status: int, message: str, details: list[Any] | None = None) -> None:
        super().__init__(f"key service answered {status}: {message}")
        self.status = status
        self.message = message
        self.details = details or []


class KeyServiceUnreachable(ClientError):
    """The key service socket could not be reached, or the connection failed."""


class BadResponse(ClientError):
    """The key service's answer is not valid HTTP or not the standard's JSON."""
