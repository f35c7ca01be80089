"""The form of the key IDs qkdd hands out: canonical UUIDs (ETSI GS QKD 014 requires
them) that name a key by the block it was agreed in and its place there.

A key ID is the 16 bytes ``prefix (12) || index (4, big-endian)``. The prefix is derived
per batch from the batch's secret (``qkdd.hybrid``), so nobody outside the two sites can
guess it; the version and variant bits of a random (version 4) UUID are set in it, so every
ID is a well-formed UUID. A store finds a key by its prefix and index without a row per key.

Any UUID splits this way, so keys named by random UUIDs (an older store's) are held as
blocks of one key under the same rules.
"""

from __future__ import annotations

import struct
import uuid
from typing import Final

from qkdd.errors import QkddError

ID_PREFIX_SIZE: Final = 12
MAX_INDEX: Final = 0xFFFFFFFF


class KeyIdError(QkddError, ValueError):
    """A text that is not a canonical key ID."""


def uuid_prefix(raw: bytes) -> bytes:
    """12 pseudo-random bytes turned into a key-ID prefix: the UUID version (4) and
    variant (RFC 9562) bits set, the other 90 bits kept."""
    if len(raw) != ID_PREFIX_SIZE:
        raise ValueError(f"a key-ID prefix is {ID_PREFIX_SIZE} bytes")
    prefix = bytearray(raw)
    prefix[6] = (prefix[6] & 0x0F) | 0x40
    prefix[8] = (prefix[8] & 0x3F) | 0x80
    return bytes(prefix)


def key_id(prefix: bytes, index: int) -> str:
    """The key ID of key ``index`` of the block named ``prefix``."""
    return str(uuid.UUID(bytes=prefix + struct.pack(">I", index)))


def key_ids(prefix: bytes, first: int, count: int) -> list[str]:
    """The IDs of ``count`` consecutive keys from index ``first`` (one format call each)."""
    hex_prefix = prefix.hex()
    head = f"{hex_prefix[:8]}-{hex_prefix[8:12]}-{hex_prefix[12:16]}-{hex_prefix[16:20]}-"
    tail = hex_prefix[20:24]
    return [f"{head}{tail}{index:08x}" for index in range(first, first + count)]


def split_key_id(text: str) -> tuple[bytes, int]:
    """(prefix, index) of a key ID; KeyIdError if it is not a UUID."""
    try:
        raw = uuid.UUID(text).bytes
    except (ValueError, TypeError, AttributeError):
        raise KeyIdError(f"key ID {text!r} is not a UUID") from None
    return raw[:ID_PREFIX_SIZE], struct.unpack(">I", raw[ID_PREFIX_SIZE:])[0]
