"""QKD key IDs and runs, as the QKD buffer and key agreement pass them around.

A QKD key ID is a UUID. Devices and the store spell it as canonical lowercase text; the
peer protocol, the buffer's frames and a batch's digest use its 16 bytes. A run
(``QkdRun``) is QKD keys consecutive in a buffer's receive order, as a batch names them:
their IDs (one bytes object, 16 bytes per key), their material, and where they sit in the
buffer (receive numbers), so that consuming the run is a range, not a lookup per key.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from qkdd.crypto import hash_bytes
from qkdd.sealing import StoreError

QKD_KEY_ID_SIZE: Final = 16


@dataclass(frozen=True)
class StoredQkdKey:
    key_id: str
    material: bytes = field(repr=False)


class QkdKeyFields(Protocol):
    """What storing a QKD key reads of it: a device driver's own key record passes as it
    is, with no copy per key at device rates."""

    @property
    def key_id(self) -> str: ...

    @property
    def material(self) -> bytes: ...


@dataclass(frozen=True)
class QkdRun:
    """QKD keys consecutive in a buffer's receive order, as a batch names them."""

    id_blob: bytes  # the 16-byte IDs in receive order, concatenated
    material: bytes = field(repr=False, compare=False)  # their material concatenated
    # Receive numbers of the first and the last key, when read from a buffer: every key
    # held between them is in the run (a key used meanwhile is not held any more).
    first_seq: int = field(default=-1, compare=False)
    last_seq: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        if not self.id_blob or len(self.id_blob) % QKD_KEY_ID_SIZE:
            raise ValueError(f"a run is one or more QKD key IDs of {QKD_KEY_ID_SIZE} bytes")

    @classmethod
    def of(cls, key_ids: Iterable[bytes], material: bytes) -> QkdRun:
        """A run from separate 16-byte IDs (not read from a buffer)."""
        ids = list(key_ids)
        if not ids or any(len(k) != QKD_KEY_ID_SIZE for k in ids):
            raise ValueError(f"a run is one or more QKD key IDs of {QKD_KEY_ID_SIZE} bytes")
        return cls(b"".join(ids), material)

    @property
    def key_ids(self) -> tuple[bytes, ...]:
        blob, size = self.id_blob, QKD_KEY_ID_SIZE
        return tuple(blob[i : i + size] for i in range(0, len(blob), size))

    @property
    def texts(self) -> tuple[str, ...]:
        """The IDs as canonical UUID text (as the store names them)."""
        return tuple(texts_of(self.id_blob))

    @property
    def first_key_id(self) -> bytes:
        return self.id_blob[:QKD_KEY_ID_SIZE]

    @property
    def count(self) -> int:
        return len(self.id_blob) // QKD_KEY_ID_SIZE

    def digest(self) -> bytes:
        """SHA-256 over the 16-byte key IDs, in order."""
        return hash_bytes(self.id_blob)


def key_id_bytes(key_id: str) -> bytes:
    """The 16 bytes of a QKD key ID (a UUID, as devices and the peer protocol carry it)."""
    try:
        return uuid.UUID(key_id).bytes
    except ValueError:
        raise StoreError(f"QKD key ID {key_id!r} is not a UUID") from None


def id_text(raw: bytes) -> str:
    """Canonical UUID text of 16 bytes (as ``str(uuid.UUID(bytes=raw))``, faster)."""
    if len(raw) != QKD_KEY_ID_SIZE:
        raise StoreError(f"a QKD key ID is {QKD_KEY_ID_SIZE} bytes, not {len(raw)}")
    h = bytes(raw).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def texts_of(id_blob: bytes) -> list[str]:
    """Canonical UUID texts of 16-byte IDs concatenated (one hex conversion for all)."""
    h = bytes(id_blob).hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-"
        f"{h[i + 20 : i + 32]}"
        for i in range(0, len(h), 2 * QKD_KEY_ID_SIZE)
    ]


def raw_id(key_id: str | bytes) -> bytes:
    """The 16 bytes of a QKD key ID given as text or as its 16 bytes; StoreError if it is
    not a UUID."""
    if isinstance(key_id, bytes):
        if len(key_id) != QKD_KEY_ID_SIZE:
            raise StoreError(f"a QKD key ID is {QKD_KEY_ID_SIZE} bytes, not {len(key_id)}")
        return key_id
    # Fast path for the usual form; anything else (braces, urn:uuid:) through uuid.
    if len(key_id) == 36 and key_id[8] == key_id[13] == key_id[18] == key_id[23] == "-":
        try:
            raw = bytes.fromhex(key_id.replace("-", ""))
        except ValueError:
            raw = b""
        if len(raw) == QKD_KEY_ID_SIZE:
            return raw
    return key_id_bytes(key_id)


def raw_ids(key_ids: Iterable[str | bytes]) -> list[bytes]:
    """The 16 bytes of many IDs, in order; canonical texts converted at once."""
    listed = list(key_ids)
    if listed and all(isinstance(k, str) for k in listed):
        texts: Sequence[str] = listed  # type: ignore[assignment]
        joined = "".join(texts)
        n = len(texts)
        if (
            len(joined) == 36 * n
            and joined[8::36] == joined[13::36] == joined[18::36] == joined[23::36] == "-" * n
        ):
            try:
                blob = bytes.fromhex(joined.replace("-", ""))
            except ValueError:
                blob = b""
            if len(blob) == QKD_KEY_ID_SIZE * n:
                return [blob[i : i + QKD_KEY_ID_SIZE] for i in range(0, len(blob), 16)]
    return [raw_id(k) for k in listed]


def id_index(key_ids: bytes, raw: bytes) -> int | None:
    """Index of a 16-byte ID in IDs concatenated, or None (only aligned matches count)."""
    position = key_ids.find(raw)
    while position != -1:
        if position % QKD_KEY_ID_SIZE == 0:
            return position // QKD_KEY_ID_SIZE
        position = key_ids.find(raw, position + 1)
    return None
