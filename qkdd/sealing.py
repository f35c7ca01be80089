"""Key material sealed at rest, and the key-check value that ties a store to its
key-encryption key.

Every sealed row is AES-256-GCM under a key derived from the site's key-encryption key
(KEK), with associated data naming the row (its kind, peer, key ID, SAE pair, size), so a
ciphertext moved to another row does not open. A chunk of a key block (many keys sealed
together, ``qkdd.store.key_blocks``) is named by its peer, ID prefix, first index, key
count, SAE pair and size, and also by its taken-bitmap: the bytes of a handed-out key are
zero in the sealed material, so a bitmap altered on disk must not open rather than hand
out zeros.

A store remembers which KEK it belongs to: when it is created, a fixed plaintext
(``labels.KEK_CHECK_PLAINTEXT``) is sealed into its meta table with associated data naming
the store. Opening the store opens that value first, before anything is written, so a
wrong KEK is refused instead of sealing rows that the right one could never open. A store
from before key-check values is checked against its own oldest sealed rows instead
(``check_key_encryption_key``), then given its value.

A row that does not open later (damaged on disk) is moved to ``quarantined_rows`` by
``move_to_quarantine``; what that means for each kind of key is the key store's business.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qkdd import labels
from qkdd.crypto import (
    AEAD_NONCE_SIZE,
    AT_REST_AEAD_ALGORITHM,
    Aead,
    AuthenticationFailed,
    constant_time_equal,
    hkdf,
)
from qkdd.errors import StoreError as StoreError
from qkdd.hybrid import lp

KEK_SIZE: Final = 32
STORE_ID_SIZE: Final = 16
KEK_CHECK_NAME: Final = "kek_check"
# A store without a key-check value is checked against up to this many of the oldest
# sealed rows of each table.
LEGACY_SAMPLE_ROWS: Final = 8

QUARANTINE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS quarantined_rows (
    seq            INTEGER PRIMARY KEY,
    table_name     TEXT NOT NULL,
    row_key        TEXT NOT NULL,
    sealed         BLOB NOT NULL,
    quarantined_at REAL NOT NULL
);
"""


class WrongKeyEncryptionKey(StoreError):
    """The key-encryption key is not the one the store was created with."""


class RowDoesNotOpen(StoreError):
    """A sealed row does not open: it was altered or moved, or sealed under another key."""


class Sealer:
    """Seals key material at rest; ``open`` raises RowDoesNotOpen if a row was tampered with."""

    def __init__(self, key_encryption_key: bytes) -> None:
        if len(key_encryption_key) != KEK_SIZE:
            raise StoreError(f"the key-encryption key must be {KEK_SIZE} bytes")
        seal_key = hkdf(b"", key_encryption_key, labels.LABEL_STORE_SEAL_KEY, 32)
        self._aead = Aead(seal_key, AT_REST_AEAD_ALGORITHM)

    def seal(self, associated: bytes, material: bytes) -> bytes:
        nonce = os.urandom(AEAD_NONCE_SIZE)
        return nonce + self._aead.seal(nonce, material, associated)

    def open(self, associated: bytes, sealed: bytes) -> bytes:
        try:
            return self._aead.open(sealed[:AEAD_NONCE_SIZE], sealed[AEAD_NONCE_SIZE:], associated)
        except AuthenticationFailed:
            raise RowDoesNotOpen(
                "a sealed key row does not open: wrong key-encryption key, or the row was "
                "altered or moved"
            ) from None

    def open_many(self, rows: Sequence[tuple[bytes, bytes]]) -> list[bytes | None]:
        """``open`` for many (associated data, sealed) at once: None for each that does
        not open (the caller sets it aside as ``open`` would have told it to)."""
        size = AEAD_NONCE_SIZE
        return self._aead.open_many(
            (sealed[:size], sealed[size:], associated) for associated, sealed in rows
        )

    def __repr__(self) -> str:
        return "<Sealer (key hidden)>"


# -- the associated data of each kind of sealed row ----------------------------------------


@functools.lru_cache(maxsize=64)
def _qkd_row_aad_head(peer_site: str) -> bytes:
    return lp(labels.AAD_QKD_KEY_ROW) + lp(peer_site.encode())


_CANONICAL_ID_LENGTH = lp(b"x" * 36)[:4]


def qkd_row_aad(peer_site: str, key_id: str) -> bytes:
    # Made once per buffered key on every read: the part naming the peer is kept, and a
    # canonical 36-character ID's length prefix too.
    raw = key_id.encode()
    length = _CANONICAL_ID_LENGTH if len(raw) == 36 else lp(raw)[:4]
    return _qkd_row_aad_head(peer_site) + length + raw


def auth_row_aad(peer_site: str, key_id: str) -> bytes:
    return lp(labels.AAD_AUTH_KEY_ROW) + lp(peer_site.encode()) + lp(key_id.encode())


def _pair_row_aad(label: bytes, key_id: str, master_sae: str, slave_sae: str, size: int) -> bytes:
    """Associated data of a sealed row of an SAE pair: its kind, key ID, pair and size."""
    return (
        lp(label)
        + lp(key_id.encode())
        + lp(master_sae.encode())
        + lp(slave_sae.encode())
        + lp(str(size).encode())
    )


def hybrid_row_aad(key_id: str, master_sae: str, slave_sae: str, size_bits: int) -> bytes:
    """A hybrid key row of a store from before key blocks (schema 2): read only to check a
    KEK and to move the rows into chunks (``qkdd.store.schema``)."""
    return _pair_row_aad(labels.AAD_HYBRID_KEY_ROW, key_id, master_sae, slave_sae, size_bits)


def pad_row_aad(key_id: str, sender_sae: str, recipient_sae: str, size_bits: int) -> bytes:
    return _pair_row_aad(labels.AAD_PAD_ROW, key_id, sender_sae, recipient_sae, size_bits)


def assigned_row_aad(key_id: str, master_sae: str, slave_sae: str, size_bits: int) -> bytes:
    return _pair_row_aad(labels.AAD_ASSIGNED_KEY_ROW, key_id, master_sae, slave_sae, size_bits)


def key_chunk_name_aad(
    peer_site: str,
    id_prefix: bytes,
    first_index: int,
    count: int,
    master_sae: str,
    slave_sae: str,
    size_bits: int,
) -> bytes:
    """The part of a chunk's associated data that never changes: which keys it holds
    (peer, ID prefix, first index, count), their pair and size."""
    return (
        lp(labels.AAD_KEY_CHUNK_ROW)
        + lp(peer_site.encode())
        + lp(bytes(id_prefix))
        + lp(first_index.to_bytes(4, "big"))
        + lp(count.to_bytes(4, "big"))
        + lp(master_sae.encode())
        + lp(slave_sae.encode())
        + lp(str(size_bits).encode())
    )


def key_chunk_aad(
    peer_site: str,
    id_prefix: bytes,
    first_index: int,
    count: int,
    master_sae: str,
    slave_sae: str,
    size_bits: int,
    taken: bytes,
) -> bytes:
    """Associated data of a sealed chunk of keys: its name, and which of its keys were
    handed out (the taken-bitmap, last)."""
    name = key_chunk_name_aad(
        peer_site, id_prefix, first_index, count, master_sae, slave_sae, size_bits
    )
    return name + lp(bytes(taken))


def qkd_frame_aad(
    peer_site: str, first_seq: int, key_size: int, key_ids: bytes, used: bytes
) -> bytes:
    """Associated data of a QKD buffer frame's sealed material (``qkdd.store.qkd_frames``):
    the peer, the first key's receive number, the key size, every ID and which keys are
    used (the bitmap, last)."""
    return (
        lp(labels.AAD_QKD_FRAME_ROW)
        + lp(peer_site.encode())
        + lp(first_seq.to_bytes(8, "big"))
        + lp(key_size.to_bytes(4, "big"))
        + lp(bytes(key_ids))
        + lp(bytes(used))
    )


@dataclass(frozen=True)
class SealedTable:
    """A key store table with a sealed ``material`` column."""

    name: str
    key_columns: tuple[str, ...]  # what identifies one row
    aad_columns: tuple[str, ...]  # the arguments of ``aad``, in order
    aad: Callable[..., bytes]
    oldest_first: str  # ORDER BY clause


SEALED_TABLES: Final = {
    table.name: table
    for table in (
        SealedTable(
            "qkd_keys", ("peer_site", "key_id"), ("peer_site", "key_id"), qkd_row_aad, "seq"
        ),
        SealedTable(
            "qkd_frames",
            ("first_seq",),
            ("peer_site", "first_seq", "key_size", "key_ids", "used"),
            qkd_frame_aad,
            "first_seq",
        ),
        SealedTable(
            "key_chunks",
            ("seq",),
            (
                "peer_site",
                "id_prefix",
                "first_index",
                "count",
                "master_sae",
                "slave_sae",
                "size_bits",
                "taken",
            ),
            key_chunk_aad,
            "created_at, seq",
        ),
        # Only in stores from before key blocks, until they are upgraded on open.
        SealedTable(
            "hybrid_keys",
            ("key_id",),
            ("key_id", "master_sae", "slave_sae", "size_bits"),
            hybrid_row_aad,
            "created_at, rowid",
        ),
        SealedTable(
            "assigned_keys",
            ("key_id", "slave_sae"),
            ("key_id", "master_sae", "slave_sae", "size_bits"),
            assigned_row_aad,
            "created_at, key_id",
        ),
        SealedTable(
            "pad_keys",
            ("key_id",),
            ("key_id", "sender_sae", "recipient_sae", "size_bits"),
            pad_row_aad,
            "created_at, rowid",
        ),
        SealedTable(
            "auth_keys", ("peer_site", "key_id"), ("peer_site", "key_id"), auth_row_aad, "seq"
        ),
    )
}


# -- the key-check value -------------------------------------------------------------------


def _key_check_aad(store_id: bytes) -> bytes:
    return lp(labels.AAD_KEK_CHECK_ROW) + lp(store_id)


def _opens_key_check(sealer: Sealer, store_id: bytes | None, value: bytes) -> bool:
    if store_id is None:
        return False
    try:
        plaintext = sealer.open(_key_check_aad(store_id), value)
    except RowDoesNotOpen:
        return False
    return constant_time_equal(plaintext, labels.KEK_CHECK_PLAINTEXT)


def _wrong_key(path: Path, how: str) -> WrongKeyEncryptionKey:
    return WrongKeyEncryptionKey(
        f"key store {path}: the key-encryption key does not match the one this store was "
        f"created with ({how}); nothing was written. Give qkdd the store's own key "
        "([store] key_encryption_key); if that key is lost, move the store file aside to "
        "start with an empty store (peers then drop the keys they shared with this site)"
    )


def check_key_encryption_key(db: sqlite3.Connection, sealer: Sealer, path: Path) -> None:
    """Raise WrongKeyEncryptionKey unless ``sealer`` holds the store's KEK; reads only.

    - A store with a key-check value: the value must open.
    - A store from before key-check values: at least half of the oldest sealed rows of its
      tables must open. A wrong key opens none (AES-GCM); half, not all, because a daemon
      of an older version started with a wrong key may have sealed newer rows under it,
      and the store belongs to the key of its oldest rows; a damaged row or two does not
      lock the site out either (such rows are quarantined once the store is open).
    - A new store, or one without sealed rows, passes: ``record_key_check`` seals the
      check value under this key."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" in tables:
        values = {
            str(name): bytes(value)
            for name, value in db.execute(
                "SELECT name, value FROM meta WHERE name IN ('store_id', ?)", (KEK_CHECK_NAME,)
            )
        }
        if KEK_CHECK_NAME in values:
            if not _opens_key_check(sealer, values.get("store_id"), values[KEK_CHECK_NAME]):
                raise _wrong_key(path, "its key-check value does not open")
            return
    tried = opened = 0
    for table in SEALED_TABLES.values():
        if table.name not in tables:
            continue
        rows = db.execute(
            f"SELECT {', '.join(table.aad_columns)}, material FROM {table.name}"
            f" WHERE material IS NOT NULL ORDER BY {table.oldest_first} LIMIT ?",
            (LEGACY_SAMPLE_ROWS,),
        )
        for *fields, sealed in rows:
            tried += 1
            try:
                sealer.open(table.aad(*fields), bytes(sealed))
                opened += 1
            except RowDoesNotOpen:
                pass
    if opened * 2 < tried:
        raise _wrong_key(path, f"{opened} of its {tried} oldest sealed rows open under it")


def record_key_check(db: sqlite3.Connection, sealer: Sealer, path: Path) -> bytes:
    """Inside a write transaction, once ``check_key_encryption_key`` passed: give the store
    its random ID and its key-check value if it has none; return the store ID. The value is
    read back and checked: another process opening the store at once may have written its
    own first."""
    # A peer that sees the store ID change knows our state was lost and drops the keys it
    # shared with us.
    db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (os.urandom(STORE_ID_SIZE),))
    store_id = bytes(db.execute("SELECT value FROM meta WHERE name='store_id'").fetchone()[0])
    db.execute(
        "INSERT OR IGNORE INTO meta VALUES (?, ?)",
        (KEK_CHECK_NAME, sealer.seal(_key_check_aad(store_id), labels.KEK_CHECK_PLAINTEXT)),
    )
    value = bytes(
        db.execute("SELECT value FROM meta WHERE name=?", (KEK_CHECK_NAME,)).fetchone()[0]
    )
    if not _opens_key_check(sealer, store_id, value):
        raise _wrong_key(path, "its key-check value does not open")
    return store_id


def move_to_quarantine(
    db: sqlite3.Connection,
    table_name: str,
    key: tuple[object, ...],
    row_key: str | None = None,
) -> None:
    """Inside a write transaction: move one sealed row to ``quarantined_rows`` (its identity
    and ciphertext, kept for examination; it is never opened again). ``key`` holds the
    values of the table's key columns; ``row_key`` names the row there (by default those
    values joined by "/")."""
    table = SEALED_TABLES[table_name]
    where = " AND ".join(f"{column}=?" for column in table.key_columns)
    name = row_key if row_key is not None else "/".join(str(part) for part in key)
    db.execute(
        "INSERT INTO quarantined_rows (table_name, row_key, sealed, quarantined_at)"
        f" SELECT ?, ?, material, ? FROM {table.name} WHERE {where}",
        (table.name, name, time.time(), *key),
    )
    db.execute(f"DELETE FROM {table.name} WHERE {where}", key)
