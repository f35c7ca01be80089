"""The sans-IO side of a KME's ETSI GS QKD 014 API: where it is (``parse_kme_url``), and the
standard's JSON objects as values (``parse_status``, ``parse_key_container``,
``canonical_key_id``), refusing anything malformed with a ``KmeResponseError`` that never
holds key material. The entries of a Key container are read by the HTTP client core shared
with qkdd's own client (``qkdd.client.roundtrip.key_entries``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from qkdd.client.roundtrip import key_entries

from ..base import CANONICAL_KEY_ID, QkdKey
from .kme_errors import KME, KmeConfigError, KmeResponseError

__all__ = [
    "API_PATH",
    "KmeEndpoint",
    "KmeStatus",
    "canonical_key_id",
    "parse_key_container",
    "parse_kme_url",
    "parse_status",
]

API_PATH = "/api/v1/keys/"

_UUID_TEXT = re.compile(CANONICAL_KEY_ID.pattern, re.IGNORECASE)  # what a KME may send


@dataclass(frozen=True)
class KmeEndpoint:
    """Where a KME's ETSI GS QKD 014 API is, parsed from its URL."""

    url: str  # as configured, for messages
    host: str
    port: int
    api_path: str  # the path prefix ending in "/api/v1/keys/"
    host_header: str

    def target(self, sae_id: str, operation: str) -> str:
        return f"{self.api_path}{quote(sae_id, safe='')}/{operation}"


def parse_kme_url(url: str) -> KmeEndpoint:
    """``https://host[:port][/prefix]``: the standard's paths go under the prefix (a gateway
    may publish the KME under one). Raises ``KmeConfigError``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise KmeConfigError(f"KME URL {url!r} is not valid: {exc}") from None
    if parts.scheme != "https":
        raise KmeConfigError(
            f"KME URL {url!r} must start with https:// (ETSI GS QKD 014 runs over HTTPS)"
        )
    if not parts.hostname:
        raise KmeConfigError(f"KME URL {url!r} names no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise KmeConfigError(
            f"KME URL {url!r} must be https://host[:port][/path] without user, query or fragment"
        )
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/api/v1/keys"):  # the operator gave the API's own path
        prefix = prefix[: -len("/api/v1/keys")]
    return KmeEndpoint(
        url=url,
        host=parts.hostname,
        port=port or 443,
        api_path=prefix + API_PATH,
        host_header=parts.netloc,
    )


@dataclass(frozen=True)
class KmeStatus:
    """The standard's Status object; fields the KME left out are None."""

    key_size: int
    stored_key_count: int
    source_kme_id: str | None = None
    target_kme_id: str | None = None
    master_sae_id: str | None = None
    slave_sae_id: str | None = None
    max_key_count: int | None = None
    max_key_per_request: int | None = None
    max_key_size: int | None = None
    min_key_size: int | None = None


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise KmeResponseError(f"the KME's {what} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise KmeResponseError(f"the KME's {what} is not a JSON object")
    return obj


def _int_field(obj: dict[str, Any], name: str, *, required: bool) -> int | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KmeResponseError(
            f"the KME's Status object has {name} = {value!r}; the standard wants a "
            "non-negative integer"
        )
    return value


def _str_field(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    return value if isinstance(value, str) else None


def parse_status(body: bytes) -> KmeStatus:
    """The Status object of a 200 answer to ``status``; raises ``KmeResponseError``."""
    obj = _json_object(body, "Status object")
    key_size = _int_field(obj, "key_size", required=True)
    stored = _int_field(obj, "stored_key_count", required=True)
    assert key_size is not None and stored is not None
    if key_size == 0:
        raise KmeResponseError("the KME's Status object has key_size 0")
    return KmeStatus(
        key_size=key_size,
        stored_key_count=stored,
        source_kme_id=_str_field(obj, "source_KME_ID"),
        target_kme_id=_str_field(obj, "target_KME_ID"),
        master_sae_id=_str_field(obj, "master_SAE_ID"),
        slave_sae_id=_str_field(obj, "slave_SAE_ID"),
        max_key_count=_int_field(obj, "max_key_count", required=False),
        max_key_per_request=_int_field(obj, "max_key_per_request", required=False) or None,
        max_key_size=_int_field(obj, "max_key_size", required=False),
        min_key_size=_int_field(obj, "min_key_size", required=False),
    )


def _shown(value: object) -> str:
    """A value from the KME, for a message: bounded, one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def canonical_key_id(value: object) -> str:
    """A KME's key_ID as a canonical lowercase UUID; raises ``KmeResponseError`` for anything
    but the standard's 8-4-4-4-12 hexadecimal form."""
    if not isinstance(value, str) or not _UUID_TEXT.fullmatch(value):
        raise KmeResponseError(
            f"the KME sent key_ID {_shown(value)}, which is not a UUID "
            "(ETSI GS QKD 014 key IDs are UUIDs, 8-4-4-4-12 hexadecimal digits); "
            "qkdd cannot use keys from this KME"
        )
    return value.lower()


def parse_key_container(body: bytes) -> list[QkdKey]:
    """The keys of a 200 answer to ``enc_keys`` or ``dec_keys``, IDs made canonical; raises
    ``KmeResponseError`` (whose message never holds key material)."""
    entries = key_entries(_json_object(body, "Key container"), KME)
    if not entries:
        raise KmeResponseError("the KME's Key container has no non-empty 'keys' array")
    keys: list[QkdKey] = []
    seen: set[str] = set()
    for value, material in entries:
        key_id = canonical_key_id(value)
        if key_id in seen:
            raise KmeResponseError(f"the KME's Key container holds key_ID {key_id} twice")
        seen.add(key_id)
        if not material:
            raise KmeResponseError(f"key {key_id} in the KME's Key container is empty")
        keys.append(QkdKey(key_id, material))
    return keys
