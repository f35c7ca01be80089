"""The SQLite key store: durability rules, file modes, erasure; keys held as chunks of the
blocks agreement makes (``qkdd.store.key_blocks``), and the upgrade of older stores."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import uuid

import pytest
from key_blocks import brute_force_ready, ids_of, materials_of, random_block

from qkdd import sealing
from qkdd.key_ids import key_id
from qkdd.keystore import KeyStore, NewKeyBlock, StoredQkdKey, StoreError
from qkdd.store.key_blocks import empty_bitmap, is_taken, keys_per_chunk, taken_count, untaken

KEK = bytes(range(32))
PER_CHUNK = keys_per_chunk(256)


def qkd(n):
    return [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(n)]


def committed(store: KeyStore, batch_id: int, *blocks: NewKeyBlock) -> None:
    store.add_batch("peer", batch_id, list(blocks), [])
    store.commit_batch("peer", batch_id)


def chunk_rows(store: KeyStore) -> int:
    return int(store._db.execute("SELECT count(*) FROM key_chunks").fetchone()[0])


def test_database_file_is_private_and_uses_wal(tmp_path):
    store = KeyStore(tmp_path / "state" / "keys.sqlite3", KEK)
    assert stat.S_IMODE((tmp_path / "state" / "keys.sqlite3").stat().st_mode) == 0o600
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._db.execute("PRAGMA secure_delete").fetchone()[0] == 1
    store.close()


def test_pending_keys_are_not_in_the_pool_until_committed(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    qkd_keys = qkd(3)
    store.store_qkd_keys("peer", qkd_keys)
    block = random_block(3)
    ids, materials = ids_of(block), materials_of(block)
    store.add_batch("peer", 1, [block], [k.key_id for k in qkd_keys])
    assert store.take_ready("sae-a", "sae-b", 1) == []
    assert store.ready_count("sae-a", "sae-b") == 0
    # By ID a pending key is served (only the committed peer can have told anyone its ID),
    # once.
    (early,) = store.take_by_ids("sae-a", "sae-b", [ids[0]])
    assert early.material == materials[0]
    assert store.take_by_ids("sae-a", "sae-b", [ids[0]]) is None
    assert store.commit_batch("peer", 1)
    assert store.ready_count("sae-a", "sae-b") == 2
    assert store.hybrid_keys_made("peer") == 2
    taken = store.take_ready("sae-a", "sae-b", 2)
    assert [(k.key_id, k.material) for k in taken] == list(zip(ids[1:], materials[1:], strict=True))
    assert store.take_ready("sae-a", "sae-b", 1) == []  # each key once
    assert chunk_rows(store) == 0  # a chunk with every key out is gone


def test_take_is_all_or_nothing(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    block = random_block(3)
    ids = ids_of(block)
    committed(store, 1, block)
    assert store.take_ready("sae-a", "sae-b", 4) == []
    assert store.ready_count("sae-a", "sae-b") == 3
    assert store.take_by_ids("sae-a", "sae-b", [ids[0], str(uuid.uuid4())]) is None
    assert store.take_by_ids("sae-a", "sae-b", [ids[0], ids[0]]) is None
    assert store.take_by_ids("sae-b", "sae-a", [ids[0]]) is None  # wrong direction
    assert store.take_by_ids("sae-a", "sae-b", [ids[0].upper()]) is None  # not an ID we gave
    beyond = key_id(block.id_prefix, 3)  # the block's prefix, an index it does not have
    assert store.take_by_ids("sae-a", "sae-b", [beyond]) is None
    assert store.take_by_ids("sae-a", "sae-b", ["not-a-uuid"]) is None
    assert store.ready_count("sae-a", "sae-b") == 3
    assert [k.key_id for k in store.take_ready("sae-a", "sae-b", 3)] == ids


def test_taken_bitmaps_agree_with_a_plain_reading():
    import random

    rng = random.Random(7)
    for _ in range(300):
        count = rng.randrange(1, 40)
        bitmap = bytearray(empty_bitmap(count))
        taken = {i for i in range(count) if rng.random() < rng.choice((0.0, 0.3, 0.9))}
        for i in taken:
            bitmap[i >> 3] |= 1 << (i & 7)
        free = [i for i in range(count) if i not in taken]
        limit = rng.randrange(0, count + 12)
        assert untaken(bitmap, count, limit) == free[:limit], (count, sorted(taken), limit)
        assert taken_count(bitmap) == len(taken)
        assert [is_taken(bitmap, i) for i in range(count)] == [i in taken for i in range(count)]


def test_take_ready_spans_chunks_oldest_first(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    first = random_block(2 * PER_CHUNK + 10)
    second = random_block(5, first_index=1000)
    committed(store, 1, first)
    committed(store, 2, second)
    assert chunk_rows(store) == 4  # three chunks of the first block, one of the second
    ids = ids_of(first) + ids_of(second)
    expected = list(zip(ids, materials_of(first) + materials_of(second), strict=True))
    out = store.take_ready("sae-a", "sae-b", PER_CHUNK - 3)
    out += store.take_ready("sae-a", "sae-b", PER_CHUNK + 11)  # over the first boundary
    out += store.take_ready("sae-a", "sae-b", 4)  # the end of one block into the next
    out += store.take_ready("sae-a", "sae-b", 1)
    assert [(k.key_id, k.material) for k in out] == expected[: len(out)]
    assert store.ready_count("sae-a", "sae-b") == len(expected) - len(out) == 2
    assert chunk_rows(store) == 1
    assert store.take_ready("sae-a", "sae-b", 3) == []  # all or nothing
    assert [k.key_id for k in store.take_ready("sae-a", "sae-b", 2)] == ids_of(second)[3:]
    assert chunk_rows(store) == 0


def test_take_ready_skips_keys_taken_by_id(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    block = random_block(PER_CHUNK + 8)
    ids, materials = ids_of(block), materials_of(block)
    committed(store, 1, block)
    picked = [PER_CHUNK + 2, 5, 0, 6, PER_CHUNK - 1]  # out of order, two chunks in one call
    got = store.take_by_ids("sae-a", "sae-b", [ids[i] for i in picked])
    assert [(k.key_id, k.material) for k in got] == [(ids[i], materials[i]) for i in picked]
    assert store.ready_count("sae-a", "sae-b") == len(ids) - len(picked)
    rest = [i for i in range(len(ids)) if i not in picked]
    out = store.take_ready("sae-a", "sae-b", len(rest))
    assert [(k.key_id, k.material) for k in out] == [(ids[i], materials[i]) for i in rest]
    assert store.take_by_ids("sae-a", "sae-b", [ids[5]]) is None
    assert chunk_rows(store) == 0


def test_a_failed_take_by_ids_changes_nothing(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    block = random_block(8)
    ids = ids_of(block)
    committed(store, 1, block)
    before = store._db.execute("SELECT taken, material FROM key_chunks").fetchall()
    assert store.take_by_ids("sae-a", "sae-b", ids[:4] + [str(uuid.uuid4())]) is None
    assert store._db.execute("SELECT taken, material FROM key_chunks").fetchall() == before
    assert store.ready_count("sae-a", "sae-b") == 8
    # A hand-out inside a caller's transaction that rolls back is not counted either.
    with pytest.raises(RuntimeError), store.transaction() as db:
        assert store.take_one_in(db, ids[0], "sae-a", "sae-b") is not None
        raise RuntimeError
    assert store.ready_count("sae-a", "sae-b") == brute_force_ready(store, "sae-a", "sae-b") == 8
    assert len(store.take_by_ids("sae-a", "sae-b", ids)) == 8


def test_ready_count_follows_every_change_and_survives_reopening(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    pairs = [("sae-a", "sae-b"), ("sae-b", "sae-a")]
    blocks = {
        1: [random_block(PER_CHUNK + 3), random_block(7, "sae-b", "sae-a")],
        2: [random_block(20)],
        3: [random_block(9, "sae-b", "sae-a")],
        4: [random_block(4)],
    }
    for batch_id, batch in blocks.items():
        store.add_batch("peer", batch_id, batch, [])

    def agrees() -> None:
        for pair in pairs:
            assert store.ready_count(*pair) == brute_force_ready(store, *pair), pair

    agrees()
    store.commit_batch("peer", 1)
    store.commit_batch("peer", 2)
    store.commit_batch("peer", 3)
    agrees()
    assert store.ready_count("sae-a", "sae-b") == PER_CHUNK + 23
    store.take_ready("sae-a", "sae-b", PER_CHUNK + 1)
    store.take_by_ids("sae-b", "sae-a", ids_of(blocks[3][0])[2:5])
    store.take_by_ids("sae-a", "sae-b", ids_of(blocks[4][0])[:1])  # pending: no change
    agrees()
    store.abort_batch("peer", 3)
    store.commit_batch("peer", 4)
    agrees()
    store._db.execute("UPDATE key_chunks SET created_at = 0 WHERE batch_id = 1")
    assert store.erase_expired(1.0) == 2 + 7
    agrees()
    assert store.ready_count("sae-b", "sae-a") == 0
    assert store.ready_count("sae-a", "sae-b") == 20 + 3
    store.close()
    store = KeyStore(path, KEK)
    agrees()
    assert store.ready_count("sae-a", "sae-b") == 23
    store.check_peer_store("peer", b"one")
    store.check_peer_store("peer", b"another")  # the peer lost its state: all withdrawn
    agrees()
    assert store.ready_count("sae-a", "sae-b") == 0


def test_state_survives_reopening(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    qkd_keys = qkd(3)
    store.store_qkd_keys("peer", qkd_keys)
    store.add_batch("peer", 5, [random_block(1)], [qkd_keys[0].key_id])
    store.close()
    store = KeyStore(path, KEK)
    assert store.pending_batches("peer") == [5]
    assert store.qkd_key_count("peer") == 2
    assert store.store_qkd_keys("peer", qkd_keys) == 0  # consumed one ignored, others already held
    # Batch IDs are never reused, even for a batch that was aborted and erased.
    assert store.next_batch_id("peer") == 6
    store.abort_batch("peer", 5)
    assert store.next_batch_id("peer") == 6
    assert chunk_rows(store) == 0


def test_key_ids_held_already_are_refused(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    block = random_block(10, first_index=100)
    store.add_batch("peer", 1, [block], [])
    for first, count in ((95, 6), (109, 3), (104, 1)):
        clash = random_block(count, first_index=first, prefix=block.id_prefix)
        with pytest.raises(StoreError, match="overlap keys held"):
            store.add_batch("peer", 2, [clash], [])
    # Next to it under the same prefix is fine.
    store.add_batch("peer", 2, [random_block(5, first_index=110, prefix=block.id_prefix)], [])
    with pytest.raises(ValueError, match="need 64 bytes"):
        NewKeyBlock(block.id_prefix, "sae-a", "sae-b", 256, 2, os.urandom(32))


def test_erased_key_material_is_gone_from_the_files(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    marker = b"\xa5" * 7 + os.urandom(25)
    block = random_block(3)
    block = NewKeyBlock(block.id_prefix, "sae-a", "sae-b", 256, 3, marker + block.material[32:])
    committed(store, 1, block)
    (sealed_before,) = store._db.execute("SELECT material FROM key_chunks").fetchone()
    (key,) = store.take_ready("sae-a", "sae-b", 1)
    assert key.material == marker
    # The chunk that stays holds zeros where the key was, and its bit is set.
    (taken, sealed_after) = store._db.execute("SELECT taken, material FROM key_chunks").fetchone()
    assert taken == b"\x01"
    aad = sealing.key_chunk_aad("peer", block.id_prefix, 0, 3, "sae-a", "sae-b", 256, taken)
    plain = sealing.Sealer(KEK).open(aad, sealed_after)
    assert plain == bytes(32) + block.material[32:]
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("k.db"))
    assert marker not in data
    assert sealed_before not in data  # the copy sealed with the key in it was overwritten
    assert sealed_after in data
    store.close()


def test_key_material_is_sealed_at_rest(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    marker = b"\x5a" * 8 + os.urandom(24)
    qkd_marker = b"\x3c" * 8 + os.urandom(24)
    store.store_qkd_keys("peer", [StoredQkdKey(str(uuid.uuid4()), qkd_marker)])
    block = random_block(2)
    store.add_batch("peer", 1, [NewKeyBlock(block.id_prefix, "sae-a", "sae-b", 256, 1, marker)], [])
    store._db.execute("PRAGMA wal_checkpoint(FULL)")
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert marker not in data and qkd_marker not in data
    store.commit_batch("peer", 1)
    assert store.take_ready("sae-a", "sae-b", 1)[0].material == marker
    store.close()


def test_swapped_chunks_do_not_open_and_are_withdrawn(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    withdrawn: list[tuple[str, list[str]]] = []
    store.on_erased = lambda reason, keys: withdrawn.append((reason, [k.key_id for k in keys]))
    first, second, third = random_block(2), random_block(3), random_block(1)
    committed(store, 1, first, second, third)
    db = store._db
    sealed = dict(db.execute("SELECT count, material FROM key_chunks WHERE count > 1"))
    db.execute("UPDATE key_chunks SET material=? WHERE count=2", (sealed[3],))
    db.execute("UPDATE key_chunks SET material=? WHERE count=3", (sealed[2],))
    # Neither opens under the other's identity: both are set aside, never handed out.
    assert store.take_by_ids("sae-a", "sae-b", ids_of(first)[:1]) is None
    assert [k.material for k in store.take_ready("sae-a", "sae-b", 1)] == [third.material]
    assert store.ready_count("sae-a", "sae-b") == 0
    assert store.quarantined_row_count() == 2
    moved = db.execute("SELECT table_name, row_key, sealed FROM quarantined_rows ORDER BY seq")
    assert [tuple(r) for r in moved] == [
        ("key_chunks", f"{ids_of(first)[0]}..{ids_of(first)[1]}", sealed[3]),
        ("key_chunks", f"{ids_of(second)[0]}..{ids_of(second)[2]}", sealed[2]),
    ]
    assert withdrawn == [("withdrawn", ids_of(first)), ("withdrawn", ids_of(second))]


def test_a_bitmap_cleared_on_disk_never_hands_out_the_zeros_left_there(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    block = random_block(4)
    committed(store, 1, block)
    assert len(store.take_ready("sae-a", "sae-b", 2)) == 2
    store._db.execute("UPDATE key_chunks SET taken = x'00', remaining = 4")
    assert store.take_by_ids("sae-a", "sae-b", ids_of(block)[:1]) is None
    assert store.take_ready("sae-a", "sae-b", 1) == []
    assert store.quarantined_row_count() == 1
    assert store.ready_count("sae-a", "sae-b") == 0


def test_a_row_whose_count_contradicts_its_bitmap_is_set_aside(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    block = random_block(4)
    committed(store, 1, block)
    assert len(store.take_ready("sae-a", "sae-b", 2)) == 2
    store._db.execute("UPDATE key_chunks SET remaining = 4")
    store.close()
    store = KeyStore(path, KEK)  # counts what the rows say: 4
    assert store.take_ready("sae-a", "sae-b", 3) == []  # never 2 keys for 3 asked
    assert store.quarantined_row_count() == 1
    assert store.ready_count("sae-a", "sae-b") == 0


def test_wrong_key_encryption_key_does_not_open_the_store(tmp_path):
    from qkdd.keystore import WrongKeyEncryptionKey

    store = KeyStore(tmp_path / "k.db", KEK)
    committed(store, 1, random_block(1))
    store.close()
    with pytest.raises(WrongKeyEncryptionKey, match="does not match") as info:
        KeyStore(tmp_path / "k.db", bytes(32))
    assert isinstance(info.value, StoreError)  # every caller's StoreError handling applies


def test_uncollected_keys_expire(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    erased: list[tuple[str, list[str]]] = []
    store.on_erased = lambda reason, keys: erased.append((reason, [k.key_id for k in keys]))
    old = random_block(3)
    store.add_batch("peer", 1, [old], [])
    store.add_batch("peer", 2, [random_block(1)], [])
    store.commit_batch("peer", 1)
    store.take_by_ids("sae-a", "sae-b", ids_of(old)[1:2])
    assert store.erase_expired(time.time() - 60) == 0  # still young
    assert store.erase_expired(time.time() + 1) == 2  # only the ready ones; pending wait for resync
    assert erased == [("expired", [ids_of(old)[0], ids_of(old)[2]])]
    assert store.ready_count("sae-a", "sae-b") == 0
    assert store.pending_batches("peer") == [2]


# -- the upgrade of a store from before key blocks (schema 2) ----------------------------

OLD_HYBRID_TABLE = """
CREATE TABLE hybrid_keys (
    key_id     TEXT PRIMARY KEY,
    peer_site  TEXT NOT NULL,
    batch_id   INTEGER NOT NULL,
    master_sae TEXT NOT NULL,
    slave_sae  TEXT NOT NULL,
    size_bits  INTEGER NOT NULL,
    material   BLOB NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
    created_at REAL NOT NULL
);
CREATE INDEX hybrid_by_pair_age ON hybrid_keys (master_sae, slave_sae, state, created_at);
CREATE INDEX hybrid_by_batch ON hybrid_keys (peer_site, batch_id);
"""


def old_store(path, rows):
    """A schema-2 store: the tables as a new store has them, but hybrid keys as rows of
    ``hybrid_keys`` sealed under the row AAD, and no schema version."""
    KeyStore(path, KEK).close()
    sealer = sealing.Sealer(KEK)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE key_chunks")
        db.execute("DELETE FROM meta WHERE name='schema'")
        db.executescript(OLD_HYBRID_TABLE)
        for key_id_, batch, master, slave, material, state, made in rows:
            aad = sealing.hybrid_row_aad(key_id_, master, slave, 8 * len(material))
            sealed = sealer.seal(aad, material)
            db.execute(
                "INSERT INTO hybrid_keys VALUES (?, 'peer', ?, ?, ?, ?, ?, ?, ?)",
                (key_id_, batch, master, slave, 8 * len(material), sealed, state, made),
            )
        db.execute("INSERT INTO batches VALUES ('peer', 1, 'committed'), ('peer', 2, 'pending')")
    db.close()


def test_a_store_of_schema_2_is_upgraded_on_open(tmp_path):
    path = tmp_path / "k.db"
    keys = [(str(uuid.uuid4()), os.urandom(32)) for _ in range(5)]
    rows = [
        (keys[0][0], 1, "sae-a", "sae-b", keys[0][1], "ready", 300.0),
        (keys[1][0], 1, "sae-a", "sae-b", keys[1][1], "ready", 100.0),
        (keys[2][0], 1, "sae-b", "sae-a", keys[2][1], "ready", 200.0),
        (keys[3][0], 2, "sae-a", "sae-b", keys[3][1], "pending", 400.0),
        (keys[4][0], 1, "sae-a", "sae-b", keys[4][1], "ready", 500.0),
    ]
    old_store(path, rows)
    with sqlite3.connect(path) as db:  # one row sealed under another identity
        db.execute(
            "UPDATE hybrid_keys SET material=(SELECT material FROM hybrid_keys WHERE key_id=?)"
            " WHERE key_id=?",
            (keys[0][0], keys[4][0]),
        )
    db.close()
    store = KeyStore(path, KEK)
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
    assert "hybrid_keys" not in tables and "hybrid_by_batch" not in tables
    assert store._db.execute("SELECT value FROM meta WHERE name='schema'").fetchone() == (4,)
    assert store.quarantined_row_count() == 1  # the one that did not open
    # One chunk per key: its prefix and index from the key's ID, same state and age.
    assert chunk_rows(store) == 4
    assert store.ready_count("sae-a", "sae-b") == 2 and store.ready_count("sae-b", "sae-a") == 1
    made = store._db.execute("SELECT created_at FROM key_chunks ORDER BY created_at").fetchall()
    assert [r[0] for r in made] == [100.0, 200.0, 300.0, 400.0]
    got = store.take_ready("sae-a", "sae-b", 2)  # oldest first, as before
    assert [(k.key_id, k.material) for k in got] == [keys[1], keys[0]]
    (pending,) = store.take_by_ids("sae-a", "sae-b", [keys[3][0]])
    assert pending.material == keys[3][1]
    assert store.commit_batch("peer", 2)
    (other,) = store.take_by_ids("sae-b", "sae-a", [keys[2][0]])
    assert other.material == keys[2][1]
    assert chunk_rows(store) == 0
    store.close()
    KeyStore(path, KEK).close()  # opens again as a schema-4 store


def test_a_store_of_a_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    committed(store, 1, random_block(2))
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value=5 WHERE name='schema'")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError) as info:
        KeyStore(path, KEK)
    message = str(info.value)
    assert str(path) in message and "schema version 5" in message
    assert "knows versions up to 4" in message and "newer qkdd" in message
    assert path.read_bytes() == before
