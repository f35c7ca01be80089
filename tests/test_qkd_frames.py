"""The QKD buffer's frames (``qkdd.store.qkd_frames``): used-key bitmaps, cutting a
delivery into frames, the memory of the newest IDs, a frame's seal binding its bitmap, the
forgetting of used IDs, and the upgrade of a store that held one row per key."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd import sealing
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.store.qkd_frames import MAX_FRAME_KEYS, RecentIds, frame_groups, unused_spans

KEK = bytes(range(32))
PEER = "site-b"


def qkd(n: int, size: int = 32) -> list[StoredQkdKey]:
    return [StoredQkdKey(str(uuid.uuid4()), os.urandom(size)) for _ in range(n)]


def frame_rows(store: KeyStore) -> list[tuple[int, int, int]]:
    """(first_seq, key_count, held) of every frame, oldest first."""
    return [
        (int(f), int(n), int(h))
        for f, n, h in store._db.execute(
            "SELECT first_seq, key_count, held FROM qkd_frames ORDER BY first_seq"
        )
    ]


# -- bitmaps and cutting -------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=300), st.data())
def test_unused_spans_are_exactly_the_clear_bits(count, data):
    used = data.draw(st.sets(st.integers(min_value=0, max_value=count - 1)))
    start = data.draw(st.integers(min_value=0, max_value=count))
    bitmap = sum(1 << i for i in used).to_bytes((count + 7) // 8, "little")
    spans = unused_spans(bitmap, count, start)
    covered = [i for begin, end in spans for i in range(begin, end)]
    assert covered == [i for i in range(start, count) if i not in used]
    # Spans are maximal: none touches the next.
    assert all(a_end < b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:], strict=False))


def test_a_delivery_is_cut_by_count_and_by_key_size():
    keys = [(os.urandom(16), b"x" * 32) for _ in range(5)]
    assert [len(g) for g in frame_groups(keys, most=2)] == [2, 2, 1]
    mixed = keys[:2] + [(os.urandom(16), b"y" * 16)] + keys[2:]
    assert [len(g) for g in frame_groups(mixed, most=10)] == [2, 1, 3]
    assert [g[0][1] for g in frame_groups(mixed, most=10)] == [b"x" * 32, b"y" * 16, b"x" * 32]


def test_recent_ids_keep_at_least_the_memory_and_forget_older_frames():
    recent = RecentIds()
    frames = [(1 + 4 * i, b"".join(os.urandom(16) for _ in range(4))) for i in range(5)]
    for first, ids in frames:
        recent.add(first, ids, memory=6)
    # 20 keys added: the newest frames holding at least 6 keys stay (two frames of 4).
    assert len(recent) == 8 and recent.start_seq == 13
    assert recent.seq_of(frames[4][1][16:32]) == 18
    assert recent.seq_of(frames[0][1][:16]) is None
    assert recent.frame_first(19) == 17 and recent.frame_first(14) == 13
    assert recent.frame_first(3) is None


# -- storage -------------------------------------------------------------------------------


def test_a_delivery_is_one_row_per_frame(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    store.store_qkd_keys(PEER, qkd(MAX_FRAME_KEYS + 10))
    store.store_qkd_keys(PEER, qkd(3))
    assert frame_rows(store) == [
        (1, MAX_FRAME_KEYS, MAX_FRAME_KEYS),
        (MAX_FRAME_KEYS + 1, 10, 10),
        (MAX_FRAME_KEYS + 11, 3, 3),
    ]
    store.close()


def test_a_used_key_marked_unused_again_does_not_open(tmp_path):
    """The bitmap is in the seal's associated data: clearing a used key's bit by hand (to
    use it twice) leaves a frame that does not open, so its keys are never served."""
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    keys = qkd(4)
    store.store_qkd_keys(PEER, keys)
    store.quarantine_qkd_keys(PEER, [keys[0].key_id])
    store._db.execute("UPDATE qkd_frames SET used=x'00', held=4")
    store._held[PEER] = 4
    assert store.get_qkd_keys(PEER, [k.key_id for k in keys]) == {}
    assert store.quarantined_row_count() == 1
    assert store.qkd_key_count(PEER) == 0
    store.close()


def ten_frames_24_used(tmp_path: Path) -> tuple[KeyStore, list[StoredQkdKey]]:
    """A store remembering 8 IDs, ten frames of four keys, the oldest 24 used."""
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    store.consumed_memory = 8
    keys = qkd(40)
    for start in range(0, 40, 4):
        store.store_qkd_keys(PEER, keys[start : start + 4])
    run = store.oldest_qkd_run(PEER, 24 * 32, 100)
    assert run is not None
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, run)
    return store, keys


def test_used_frames_are_forgotten_once_both_buffers_passed_them(tmp_path):
    store, keys = ten_frames_24_used(tmp_path)
    # The peer's horizon names a key it still holds: our oldest, keys[24].
    store.apply_peer_horizon(PEER, [keys[24].key_id], keys[39].key_id)
    rows = frame_rows(store)
    assert rows[0][0] == 25 and all(held == 4 for _, _, held in rows)
    # A forgotten ID may come back from a device only beyond its window: it is new then.
    assert not store.is_qkd_key_consumed(PEER, keys[0].key_id)
    assert store.is_qkd_key_consumed(PEER, keys[30].key_id) is False
    assert store.qkd_keys_used(PEER) == 24
    store.close()


def test_used_frames_stay_while_the_peer_still_holds_their_keys(tmp_path):
    store, keys = ten_frames_24_used(tmp_path)
    # The peer's oldest is keys[2]: it has not used them yet, our memory of them stays.
    outcome = store.apply_peer_horizon(PEER, [keys[2].key_id, keys[3].key_id], None)
    assert outcome.skip == (keys[2].key_id, keys[3].key_id)
    assert len(frame_rows(store)) == 10
    assert store.is_qkd_key_consumed(PEER, keys[5].key_id)
    store.close()


def test_used_frames_are_forgotten_while_the_peer_lists_keys_used_here(tmp_path):
    """The peer still holds keys we used (a batch it has not taken yet): used IDs older
    than its oldest are forgotten all the same, and nothing is left to look at again."""
    store, keys = ten_frames_24_used(tmp_path)
    listed = [keys[12].key_id, keys[13].key_id]
    outcome = store.apply_peer_horizon(PEER, listed, keys[39].key_id)
    assert outcome.skip == tuple(listed) and not outcome.unresolved
    # Frames wholly before keys[12] (receive number 13) are forgotten; its frame stays.
    assert frame_rows(store)[0] == (13, 4, 0)
    assert store.is_qkd_key_consumed(PEER, keys[12].key_id)
    assert not store.is_qkd_key_consumed(PEER, keys[0].key_id)
    store.close()


# -- the upgrade of a store with one row per key -------------------------------------------


def legacy_store(path: Path, peers: dict[str, list[StoredQkdKey]], damaged: set[str]) -> None:
    """A store of an earlier version: its buffer is ``qkd_keys``, one sealed row per key,
    in the order given (interleaving peers by position)."""
    KeyStore(path, KEK).close()
    seal = sealing.Sealer(KEK)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE qkd_frames")
        db.execute(
            "CREATE TABLE qkd_keys (seq INTEGER PRIMARY KEY, peer_site TEXT NOT NULL,"
            " key_id TEXT NOT NULL, material BLOB NOT NULL, received_at REAL NOT NULL,"
            " UNIQUE (peer_site, key_id))"
        )
        db.execute("UPDATE meta SET value=3 WHERE name='schema'")
        rows = []
        longest = max(len(keys) for keys in peers.values())
        for i in range(longest):
            for peer, keys in peers.items():
                if i < len(keys):
                    rows.append((peer, keys[i]))
        for seq, (peer, key) in enumerate(rows, start=1):
            sealed = seal.seal(sealing.qkd_row_aad(peer, key.key_id), key.material)
            if key.key_id in damaged:
                sealed = sealed[:-1] + bytes([sealed[-1] ^ 1])
            db.execute(
                "INSERT INTO qkd_keys VALUES (?, ?, ?, ?, ?)",
                (seq * 2, peer, key.key_id, sealed, time.time()),
            )
        db.execute("INSERT OR REPLACE INTO counters VALUES ('qkd-seq', ?)", (2 * len(rows),))


def test_a_store_with_one_row_per_key_moves_into_frames_on_open(tmp_path):
    path = tmp_path / "keys.sqlite3"
    ours, theirs = qkd(6), qkd(3)
    legacy_store(path, {PEER: ours, "site-c": theirs}, damaged={ours[4].key_id})
    store = KeyStore(path, KEK)
    assert [k.key_id for k in store.oldest_qkd_keys(PEER)] == [
        k.key_id for i, k in enumerate(ours) if i != 4
    ]
    assert [k.material for k in store.oldest_qkd_keys("site-c")] == [k.material for k in theirs]
    assert store.qkd_key_count(PEER) == 5 and store.qkd_key_count("site-c") == 3
    # The damaged row is set aside and its key counts as used; a re-sent copy is ignored.
    assert store.quarantined_row_count() == 1
    assert store.is_qkd_key_consumed(PEER, ours[4].key_id)
    assert store.store_qkd_keys(PEER, [ours[4], ours[0]]) == 0
    # Receive numbers are kept (rows were numbered 2, 4, 6, ...: one frame per row here).
    rows = store._db.execute("SELECT first_seq FROM qkd_frames WHERE peer_site=?", (PEER,))
    firsts = [f for (f,) in rows]
    assert firsts == [2, 6, 10, 14, 18]
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
    assert "qkd_keys" not in tables
    # New keys are numbered after the old ones.
    store.store_qkd_keys(PEER, qkd(1))
    assert max(f for f, _, _ in frame_rows(store)) == 19
    store.close()


def test_consecutive_legacy_rows_of_one_peer_become_one_frame(tmp_path):
    path = tmp_path / "keys.sqlite3"
    keys = qkd(5)
    legacy_store(path, {PEER: keys}, damaged=set())
    with sqlite3.connect(path) as db:  # renumber 1..5: consecutive receive numbers
        db.execute("UPDATE qkd_keys SET seq = seq / 2")
    store = KeyStore(path, KEK)
    assert frame_rows(store) == [(1, 5, 5)]
    run = store.oldest_qkd_run(PEER, 5 * 32, 10)
    assert run is not None and run.material == b"".join(k.material for k in keys)
    store.close()


def test_a_store_from_a_newer_qkdd_is_still_refused(tmp_path):
    path = tmp_path / "keys.sqlite3"
    KeyStore(path, KEK).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value=99 WHERE name='schema'")
    with pytest.raises(sealing.StoreError, match="newer qkdd"):
        KeyStore(path, KEK)
