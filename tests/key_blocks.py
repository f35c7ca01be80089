"""Blocks of random keys for tests of the key store (``qkdd.store.key_blocks``), and
looks at what the store holds that no public method shows."""

from __future__ import annotations

import os
import sqlite3

from qkdd.key_ids import key_ids, split_key_id, uuid_prefix
from qkdd.keystore import KeyStore, NewKeyBlock
from qkdd.sealing import key_chunk_aad
from qkdd.store.key_blocks import untaken


def random_block(
    count: int,
    master: str = "sae-a",
    slave: str = "sae-b",
    size_bits: int = 256,
    first_index: int = 0,
    prefix: bytes | None = None,
) -> NewKeyBlock:
    """``count`` random keys of one pair under a fresh (or the given) ID prefix."""
    return NewKeyBlock(
        prefix if prefix is not None else uuid_prefix(os.urandom(12)),
        master,
        slave,
        size_bits,
        count,
        os.urandom(count * size_bits // 8),
        first_index,
    )


def ids_of(block: NewKeyBlock) -> list[str]:
    return key_ids(block.id_prefix, block.first_index, block.count)


def materials_of(block: NewKeyBlock) -> list[bytes]:
    size = block.size_bits // 8
    return [block.material[i * size : (i + 1) * size] for i in range(block.count)]


def brute_force_ready(store: KeyStore, master: str, slave: str) -> int:
    """Ready keys of the pair counted from every chunk's taken-bitmap (never the counts the
    store keeps)."""
    held = 0
    for count, taken in store._db.execute(
        "SELECT count, taken FROM key_chunks WHERE master_sae=? AND slave_sae=? AND state='ready'",
        (master, slave),
    ):
        held += count - int.from_bytes(taken, "little").bit_count()
    return held


def held_key_ids(db: sqlite3.Connection, master: str, state: str = "ready") -> set[str]:
    """IDs of the untaken keys of ``master``'s pairs in chunks of ``state``, read from a
    store's database (also a copy opened read-only)."""
    held: set[str] = set()
    for prefix, first, count, taken in db.execute(
        "SELECT id_prefix, first_index, count, taken FROM key_chunks"
        " WHERE master_sae=? AND state=?",
        (master, state),
    ):
        ids = key_ids(bytes(prefix), first, count)
        held.update(ids[i] for i in untaken(bytes(taken), count, count))
    return held


def corrupt_chunk_of(store: KeyStore, key_id_text: str) -> None:
    """Flip one bit of the sealed material of the chunk that holds this key."""
    prefix, index = split_key_id(key_id_text)
    seq, sealed = store._db.execute(
        "SELECT seq, material FROM key_chunks WHERE id_prefix=? AND first_index<=?"
        " ORDER BY first_index DESC LIMIT 1",
        (prefix, index),
    ).fetchone()
    broken = bytearray(sealed)
    broken[-1] ^= 1
    store._db.execute("UPDATE key_chunks SET material=? WHERE seq=?", (bytes(broken), seq))


def held_keys(store: KeyStore, master: str, slave: str) -> dict[str, tuple[str, bytes]]:
    """Every key of the pair the store holds: key ID -> (state, material), opened from
    its chunk (AssertionError-free only if every chunk opens)."""
    found: dict[str, tuple[str, bytes]] = {}
    for peer, prefix, first, count, size, state, taken, sealed in store._db.execute(
        "SELECT peer_site, id_prefix, first_index, count, size_bits, state, taken, material"
        " FROM key_chunks WHERE master_sae=? AND slave_sae=?",
        (master, slave),
    ):
        aad = key_chunk_aad(peer, prefix, first, count, master, slave, size, taken)
        plain = store.sealer.open(aad, sealed)
        ids, size_bytes = key_ids(prefix, first, count), size // 8
        for i in untaken(taken, count, count):
            found[ids[i]] = (state, plain[i * size_bytes : (i + 1) * size_bytes])
    return found
