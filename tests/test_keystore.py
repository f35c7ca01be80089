"""The SQLite key store: durability rules, file modes, erasure."""

from __future__ import annotations

import os
import stat
import uuid

from qkdd.keystore import KeyStore, NewHybridKey, StoredQkdKey

KEK = bytes(range(32))


def qkd(n):
    return [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(n)]


def hybrid(batch_keys):
    return [
        NewHybridKey(str(uuid.uuid4()), "sae-a", "sae-b", 256, os.urandom(32)) for _ in batch_keys
    ]


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
    keys = hybrid(qkd_keys)
    store.add_batch("peer", 1, keys, [k.key_id for k in qkd_keys])
    assert store.take_ready("sae-a", "sae-b", 1) == []
    # By ID a pending key is served (only the committed peer can have told anyone its ID),
    # once.
    (early,) = store.take_by_ids("sae-a", "sae-b", [keys[0].key_id])
    assert early.material == keys[0].material
    assert store.take_by_ids("sae-a", "sae-b", [keys[0].key_id]) is None
    assert store.commit_batch("peer", 1)
    assert store.ready_count("sae-a", "sae-b") == 2
    taken = store.take_ready("sae-a", "sae-b", 2)
    assert [k.material for k in taken] == [k.material for k in keys[1:]]
    assert store.take_ready("sae-a", "sae-b", 1) == []  # each key once


def test_take_is_all_or_nothing(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    keys = hybrid(range(3))
    store.add_batch("peer", 1, keys, [])
    store.commit_batch("peer", 1)
    assert store.take_ready("sae-a", "sae-b", 4) == []
    assert store.ready_count("sae-a", "sae-b") == 3
    assert store.take_by_ids("sae-a", "sae-b", [keys[0].key_id, str(uuid.uuid4())]) is None
    assert store.take_by_ids("sae-a", "sae-b", [keys[0].key_id, keys[0].key_id]) is None
    assert store.take_by_ids("sae-b", "sae-a", [keys[0].key_id]) is None  # wrong direction
    assert store.ready_count("sae-a", "sae-b") == 3


def test_state_survives_reopening(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    qkd_keys = qkd(3)
    store.store_qkd_keys("peer", qkd_keys)
    keys = hybrid(range(1))
    store.add_batch("peer", 5, keys, [qkd_keys[0].key_id])
    store.close()
    store = KeyStore(path, KEK)
    assert store.pending_batches("peer") == [5]
    assert store.qkd_key_count("peer") == 2
    assert store.store_qkd_keys("peer", qkd_keys) == 0  # consumed one ignored, others already held
    # Batch IDs are never reused, even for a batch that was aborted and erased.
    assert store.next_batch_id("peer") == 6
    store.abort_batch("peer", 5)
    assert store.next_batch_id("peer") == 6


def test_erased_key_material_is_gone_from_the_files(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    marker = b"\xa5" * 7 + os.urandom(25)
    key = NewHybridKey(str(uuid.uuid4()), "sae-a", "sae-b", 256, marker)
    store.add_batch("peer", 1, [key], [])
    store.commit_batch("peer", 1)
    assert store.take_ready("sae-a", "sae-b", 1)
    store.close()  # checkpoints the WAL into the main file
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("k.db"))
    assert marker not in data


def test_key_material_is_sealed_at_rest(tmp_path):
    path = tmp_path / "k.db"
    store = KeyStore(path, KEK)
    marker = b"\x5a" * 8 + os.urandom(24)
    qkd_marker = b"\x3c" * 8 + os.urandom(24)
    store.store_qkd_keys("peer", [StoredQkdKey(str(uuid.uuid4()), qkd_marker)])
    store.add_batch("peer", 1, [NewHybridKey(str(uuid.uuid4()), "sae-a", "sae-b", 256, marker)], [])
    store._db.execute("PRAGMA wal_checkpoint(FULL)")
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert marker not in data and qkd_marker not in data
    store.commit_batch("peer", 1)
    assert store.take_ready("sae-a", "sae-b", 1)[0].material == marker
    store.close()


def test_swapped_rows_do_not_open_and_are_withdrawn(tmp_path):
    store = KeyStore(tmp_path / "k.db", KEK)
    first, second, third = hybrid(range(3))
    store.add_batch("peer", 1, [first, second, third], [])
    store.commit_batch("peer", 1)
    db = store._db
    sealed = dict(db.execute("SELECT key_id, material FROM hybrid_keys"))
    db.execute(
        "UPDATE hybrid_keys SET material=? WHERE key_id=?", (sealed[second.key_id], first.key_id)
    )
    db.execute(
        "UPDATE hybrid_keys SET material=? WHERE key_id=?", (sealed[first.key_id], second.key_id)
    )
    # Neither opens under the other's identity: both are set aside, never handed out.
    assert store.take_by_ids("sae-a", "sae-b", [first.key_id]) is None
    assert [k.material for k in store.take_ready("sae-a", "sae-b", 1)] == [third.material]
    assert store.ready_count("sae-a", "sae-b") == 0
    assert store.quarantined_row_count() == 2
    moved = db.execute("SELECT table_name, row_key, sealed FROM quarantined_rows ORDER BY seq")
    assert [tuple(r) for r in moved] == [
        ("hybrid_keys", first.key_id, sealed[second.key_id]),
        ("hybrid_keys", second.key_id, sealed[first.key_id]),
    ]


def test_wrong_key_encryption_key_does_not_open_the_store(tmp_path):
    import pytest

    from qkdd.keystore import StoreError, WrongKeyEncryptionKey

    store = KeyStore(tmp_path / "k.db", KEK)
    store.add_batch("peer", 1, hybrid(range(1)), [])
    store.commit_batch("peer", 1)
    store.close()
    with pytest.raises(WrongKeyEncryptionKey, match="does not match") as info:
        KeyStore(tmp_path / "k.db", bytes(32))
    assert isinstance(info.value, StoreError)  # every caller's StoreError handling applies


def test_uncollected_keys_expire(tmp_path):
    import time

    store = KeyStore(tmp_path / "k.db", KEK)
    store.add_batch("peer", 1, hybrid(range(2)), [])
    store.add_batch("peer", 2, hybrid(range(1)), [])
    store.commit_batch("peer", 1)
    assert store.erase_expired(time.time() - 60) == 0  # still young
    assert store.erase_expired(time.time() + 1) == 2  # only the ready ones; pending wait for resync
    assert store.ready_count("sae-a", "sae-b") == 0
    assert store.pending_batches("peer") == [2]
