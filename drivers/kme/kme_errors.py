"""What goes wrong with an ETSI GS QKD 014 KME, for operators: the ``KmeError`` hierarchy,
the error for a refused request (``refusal``, from the standard's Error object), and the
words the shared HTTP client core (``qkdd.client.roundtrip``) uses for a KME (``KME``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from qkdd.client.roundtrip import Service

from ..device_errors import DeviceError

__all__ = [
    "KME",
    "KmeConfigError",
    "KmeError",
    "KmeRefusedError",
    "KmeResponseError",
    "KmeStoreError",
    "KmeTlsError",
    "KmeUnauthorizedError",
    "KmeUnavailableError",
    "KmeUnreachableError",
    "UnknownKeyIdsError",
    "refusal",
]

#: How much of a KME's error text goes into messages.
MAX_MESSAGE_CHARS = 300


class KmeError(DeviceError):
    """A fault of an ETSI GS QKD 014 KME or of the way this daemon is set up to use it."""


class KmeConfigError(KmeError):
    """The configuration cannot work: a bad URL, unreadable certificate files, a key size the
    KME does not serve, or the KME knowing this client as another SAE."""


class KmeUnreachableError(KmeError):
    """No answer from the KME: it cannot be connected to, or the connection failed."""


class KmeTlsError(KmeUnreachableError):
    """The TLS handshake with the KME failed (untrusted KME certificate, client certificate
    refused, no common TLS version)."""


class KmeRefusedError(KmeError):
    """The KME answered a request with an error status."""

    def __init__(self, status: int, message: str, doing: str, where: str) -> None:
        super().__init__(f"the KME at {where} answered {doing} with {status}: {message}")
        self.status = status
        self.message = message


class KmeUnavailableError(KmeRefusedError):
    """HTTP 503: the KME has no keys to give now (QKD link down, key store empty...)."""


class KmeUnauthorizedError(KmeRefusedError):
    """HTTP 401: the KME does not accept this client as the configured SAE."""


class KmeResponseError(KmeError):
    """The KME's answer does not follow the standard (bad HTTP, JSON, key ID or key)."""


class UnknownKeyIdsError(KmeError):
    """The KME holds no keys with these IDs for this pair of SAEs (not yet, or not any more)."""

    def __init__(self, key_ids: Sequence[str], master_sae_id: str, where: str, reason: str) -> None:
        self.key_ids = tuple(key_ids)
        super().__init__(
            f"the KME at {where} holds no keys from master SAE {master_sae_id!r} with IDs "
            f"{', '.join(self.key_ids)} (it said: {reason}); if the master's KME handed them "
            "out just now they may not have reached this KME yet"
        )


class KmeStoreError(KmeError):
    """Storing keys the KME handed out failed."""


KME = Service(
    name="the KME",
    unreachable=KmeUnreachableError,
    malformed=KmeResponseError,
    # A full key container of 128 keys of 8192 bits is about 180 KB; anything near this
    # limit is not a KME answering the standard.
    max_answer_bytes=4 * 1024 * 1024,
    untrusted=(
        "the KME's certificate is not trusted ({verify}); ca_file must hold the CA that "
        "issued it, and the URL's host must be a name in it"
    ),
    refused=(
        "the KME refused this client's certificate ({reason}); cert_file must be issued by "
        "a CA the KME trusts for SAE clients, be valid now and allow client authentication"
    ),
    no_common_version=(
        "no TLS in common with the KME ({reason}); it must speak TLS 1.2 or later, and the "
        "URL's port must be its HTTPS port"
    ),
)


def _error_message(body: bytes) -> str:
    """The message of the standard's Error object, or the start of whatever came instead."""
    message: object = None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        message = obj.get("message")
    if not isinstance(message, str):
        message = body.decode("utf-8", "replace").strip() or "no message"
    text = message if message.isprintable() else message.encode("unicode_escape").decode()
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def refusal(status: int, body: bytes, doing: str, where: str) -> KmeRefusedError:
    """The error for a non-200 answer."""
    message = _error_message(body)
    if status == 503:
        return KmeUnavailableError(status, message, doing, where)
    if status in (401, 403):
        return KmeUnauthorizedError(status, message, doing, where)
    return KmeRefusedError(status, message, doing, where)
