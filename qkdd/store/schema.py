"""The key store's schema version, and the upgrade of older stores when they are opened.

The version is the ``schema`` row of ``meta``; a store without one is of version 2 or
older (or new). Version 2 held each application key as a row of ``hybrid_keys``; version 3
holds keys as chunks of key blocks (``qkdd.store.key_blocks``); version 4 holds the QKD
buffer as frames (``qkdd.store.qkd_frames``) where older ones held a row per QKD key
(``qkd_keys``): opening such a store moves them (``qkdd.store.qkd_buffer``).
Opening a version-2 store moves every row into a chunk of one key (prefix and index from
its key ID, which any UUID gives), in the same state, made at the same time, its material
sealed again under the chunk's associated data, and drops the old table: all in one
transaction, so a failure leaves the old table as it was. A store written by a newer qkdd
is refused before anything is written: this code cannot know what its tables mean.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Final

from qkdd.key_ids import KeyIdError, split_key_id
from qkdd.sealing import RowDoesNotOpen, Sealer, StoreError, hybrid_row_aad, move_to_quarantine
from qkdd.store.key_blocks import NewKeyBlock, insert_chunk_rows, seal_chunk_rows

log = logging.getLogger("qkdd.keystore")

SCHEMA_VERSION: Final = 4
SCHEMA_NAME: Final = "schema"


def _tables(db: sqlite3.Connection) -> set[str]:
    return {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def check_schema_version(db: sqlite3.Connection, path: Path) -> None:
    """Raise StoreError if the store was written by a newer qkdd; reads only."""
    if "meta" not in _tables(db):
        return
    row = db.execute("SELECT value FROM meta WHERE name=?", (SCHEMA_NAME,)).fetchone()
    if row is None:
        return
    try:
        version = int(row[0])
    except (TypeError, ValueError):
        version = -1
    if version < 0 or version > SCHEMA_VERSION:
        raise StoreError(
            f"key store {path} has schema version {row[0]!r}; this qkdd knows versions up to "
            f"{SCHEMA_VERSION}. It was written by a newer qkdd: run that version (or a newer "
            "one) on it; nothing was written. To start this version with an empty store, move "
            "the store file aside (peers then drop the keys they shared with this site)"
        )


def record_schema_version(db: sqlite3.Connection) -> None:
    """Inside a write transaction, once the store holds the current schema."""
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (SCHEMA_NAME, SCHEMA_VERSION))


def upgrade_hybrid_rows(db: sqlite3.Connection, sealer: Sealer) -> int:
    """Inside a write transaction, once the version-3 tables exist: move every row of a
    version-2 ``hybrid_keys`` table into a one-key chunk and drop the table; returns how
    many keys moved. A row that does not open is quarantined, as it would have been when
    handed out (nobody is told yet: the store is only opening)."""
    if "hybrid_keys" not in _tables(db):
        return 0
    moved = 0
    rows = db.execute(
        "SELECT key_id, peer_site, batch_id, master_sae, slave_sae, size_bits, state,"
        " created_at, material FROM hybrid_keys ORDER BY created_at, rowid"
    ).fetchall()
    for key_id, peer, batch, master, slave, size, state, created_at, sealed in rows:
        try:
            material = sealer.open(hybrid_row_aad(key_id, master, slave, size), bytes(sealed))
            prefix, index = split_key_id(key_id)
            block = NewKeyBlock(prefix, master, slave, size, 1, material, index)
        except (RowDoesNotOpen, KeyIdError, ValueError):
            move_to_quarantine(db, "hybrid_keys", (key_id,))
            log.error("event=row_quarantined table=hybrid_keys row=%s reason=does-not-open", key_id)
            continue
        insert_chunk_rows(db, seal_chunk_rows(sealer, peer, batch, block, state, created_at))
        moved += 1
    db.execute("DROP TABLE hybrid_keys")
    log.info("event=store_upgraded schema=%d keys_moved=%d", SCHEMA_VERSION, moved)
    return moved
