"""The QKD buffer at device rate (``qkdd.store.qkd_buffer``): runs of the oldest keys and runs
from a given key, consumption of a run, ingest of a delivery, and the query plans that keep
all of it off a sort or a scan of the whole buffer."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qkdd.keystore import KeyStore, StoredQkdKey, StoreError
from qkdd.store.qkd_ids import QkdRun

KEK = bytes(range(32))
PEER = "site-b"


def qkd(n: int, size: int = 32) -> list[StoredQkdKey]:
    return [StoredQkdKey(str(uuid.uuid4()), os.urandom(size)) for _ in range(n)]


def raw(key: StoredQkdKey) -> bytes:
    return uuid.UUID(key.key_id).bytes


def frames(store: KeyStore, peer: str = PEER) -> list[tuple[int, int, bytes, bytes, bytes | None]]:
    """The peer's frames straight from the table: (first_seq, count, used, IDs, sealed)."""
    rows = store._db.execute(
        "SELECT first_seq, key_count, used, key_ids, material FROM qkd_frames"
        " WHERE peer_site=? ORDER BY first_seq",
        (peer,),
    )
    return [(f, n, bytes(u), bytes(i), None if m is None else bytes(m)) for f, n, u, i, m in rows]


def held_ids(store: KeyStore, peer: str = PEER) -> list[str]:
    """The peer's buffered IDs in receive order, straight from the table: the keys of
    frames that still have material, whose used bit is clear."""
    out = []
    for _, count, used, ids, sealed in frames(store, peer):
        bits = int.from_bytes(used, "little")
        if sealed is not None:
            out += [
                str(uuid.UUID(bytes=ids[16 * i : 16 * i + 16]))
                for i in range(count)
                if not bits >> i & 1
            ]
    return out


def corrupt(store: KeyStore, key: StoredQkdKey) -> None:
    """Flip one bit of the sealed frame that holds a buffered key."""
    for first, _, _, ids, sealed in frames(store):
        if raw(key) in [ids[i : i + 16] for i in range(0, len(ids), 16)]:
            assert sealed is not None, "the key's frame holds no material"
            broken = bytearray(sealed)
            broken[-1] ^= 1
            store._db.execute(
                "UPDATE qkd_frames SET material=? WHERE first_seq=?", (bytes(broken), first)
            )
            return
    raise AssertionError("key not in any frame")


def store_each(store: KeyStore, keys: list[StoredQkdKey], peer: str = PEER) -> None:
    """One delivery, so one frame, per key."""
    for key in keys:
        assert store.store_qkd_keys(peer, [key]) == 1


@contextmanager
def statements(store: KeyStore) -> Iterator[list[str]]:
    """Every SQL statement the store runs inside the block (values filled in)."""
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        store._db.set_trace_callback(None)


@pytest.fixture
def store(tmp_path) -> Iterator[KeyStore]:
    s = KeyStore(tmp_path / "keys.sqlite3", KEK)
    yield s
    s.close()


# -- the run ------------------------------------------------------------------------------


def test_a_run_names_its_keys_by_first_id_count_and_sha256_of_the_ids():
    ids = tuple(os.urandom(16) for _ in range(3))
    run = QkdRun.of(ids, b"secret material")
    assert run.first_key_id == ids[0] and run.count == 3 and run.key_ids == ids
    assert run.texts == tuple(str(uuid.UUID(bytes=k)) for k in ids)
    assert run.digest() == hashlib.sha256(b"".join(ids)).digest()
    assert "secret" not in repr(run) and "material=" not in repr(run)
    with pytest.raises(ValueError):
        QkdRun(b"", b"")
    with pytest.raises(ValueError):
        QkdRun(b"short", b"x")
    with pytest.raises(ValueError):
        QkdRun.of([b"short"], b"x")


# -- the master's run: the oldest keys ------------------------------------------------------


def test_oldest_run_is_the_shortest_prefix_that_makes_the_bytes(store):
    keys = qkd(10)
    store.store_qkd_keys(PEER, keys)
    run = store.oldest_qkd_run(PEER, 3 * 32 + 1, 100)
    assert run is not None
    assert run.key_ids == tuple(raw(k) for k in keys[:4])
    assert run.material == b"".join(k.material for k in keys[:4])
    exact = store.oldest_qkd_run(PEER, 3 * 32, 100)
    assert exact is not None and exact.count == 3
    # Reading takes nothing away.
    assert store.qkd_key_count(PEER) == 10


def test_oldest_run_stops_at_max_keys_or_at_what_is_buffered(store):
    assert store.oldest_qkd_run(PEER, 32, 10) is None
    keys = qkd(5)
    store.store_qkd_keys(PEER, keys)
    capped = store.oldest_qkd_run(PEER, 10_000, 2)
    assert capped is not None and capped.key_ids == (raw(keys[0]), raw(keys[1]))
    short = store.oldest_qkd_run(PEER, 10_000, 100)
    assert short is not None and short.key_ids == tuple(raw(k) for k in keys)
    with pytest.raises(ValueError):
        store.oldest_qkd_run(PEER, 32, 0)


def test_oldest_run_reads_past_its_first_read_of_rows(store):
    keys = qkd(300, size=1)
    store.store_qkd_keys(PEER, keys)
    run = store.oldest_qkd_run(PEER, 250, 1000)
    assert run is not None and run.key_ids == tuple(raw(k) for k in keys[:250])


def test_runs_of_one_peer_skip_keys_of_another_received_between(store):
    ours, theirs = qkd(6), qkd(6)
    for i in range(6):  # interleaved deliveries: receive numbers alternate between peers
        store.store_qkd_keys(PEER, [ours[i]])
        store.store_qkd_keys("site-c", [theirs[i]])
    run = store.oldest_qkd_run(PEER, 4 * 32, 100)
    assert run is not None and run.key_ids == tuple(raw(k) for k in ours[:4])
    slave = store.qkd_run("site-c", raw(theirs[2]), 3)
    assert slave is not None and slave.key_ids == tuple(raw(k) for k in theirs[2:5])
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [k.key_id for k in ours[:4]])
    assert held_ids(store) == [k.key_id for k in ours[4:]]
    assert held_ids(store, "site-c") == [k.key_id for k in theirs]


def test_a_key_that_does_not_open_first_is_quarantined_and_the_run_starts_after(store):
    keys = qkd(6)
    store_each(store, keys)
    corrupt(store, keys[0])
    run = store.oldest_qkd_run(PEER, 2 * 32, 100)
    assert run is not None and run.key_ids == (raw(keys[1]), raw(keys[2]))
    assert store.quarantined_row_count() == 1
    assert store.is_qkd_key_consumed(PEER, keys[0].key_id)
    assert held_ids(store) == [k.key_id for k in keys[1:]]


def test_no_run_spans_a_key_that_does_not_open(store):
    """The peer still holds the key: a run across the gap would differ from its run. The
    keys before it are used up with it, and the run starts after it."""
    keys = qkd(8)
    store_each(store, keys)
    corrupt(store, keys[2])
    run = store.oldest_qkd_run(PEER, 4 * 32, 100)
    assert run is not None and run.key_ids == tuple(raw(k) for k in keys[3:7])
    assert store.quarantined_row_count() == 1
    assert all(store.is_qkd_key_consumed(PEER, k.key_id) for k in keys[:3])
    assert held_ids(store) == [k.key_id for k in keys[3:]]
    assert store.qkd_key_count(PEER) == 5
    # A device re-sending them does not bring them back.
    assert store.store_qkd_keys(PEER, keys[:3]) == 0


def test_an_oldest_run_inside_a_transaction_uses_it(store):
    keys = qkd(4)
    store_each(store, keys)
    corrupt(store, keys[1])
    with store.transaction():
        run = store.oldest_qkd_run(PEER, 2 * 32, 100)
    assert run is not None and run.key_ids == (raw(keys[2]), raw(keys[3]))
    assert held_ids(store) == [keys[2].key_id, keys[3].key_id]


# -- the slave's run: from a given key --------------------------------------------------------


def test_run_from_a_key_takes_the_keys_received_after_it(store):
    keys = qkd(10)
    store.store_qkd_keys(PEER, keys)
    run = store.qkd_run(PEER, raw(keys[3]), 4)
    assert run is not None
    assert run.key_ids == tuple(raw(k) for k in keys[3:7])
    assert run.material == b"".join(k.material for k in keys[3:7])
    # The device has not delivered the rest yet: shorter.
    tail = store.qkd_run(PEER, raw(keys[8]), 5)
    assert tail is not None and tail.key_ids == (raw(keys[8]), raw(keys[9]))
    assert store.qkd_run(PEER, uuid.uuid4().bytes, 3) is None
    assert store.qkd_run("site-c", raw(keys[3]), 3) is None
    with pytest.raises(StoreError):
        store.qkd_run(PEER, b"short", 3)


def test_run_from_a_key_matches_the_masters_digest(tmp_path):
    master, slave = KeyStore(tmp_path / "a.db", KEK), KeyStore(tmp_path / "b.db", KEK)
    keys = qkd(20)
    master.store_qkd_keys(PEER, keys)
    slave.store_qkd_keys("site-a", keys[2:])  # the slave lacks two the master has
    master.quarantine_qkd_keys(PEER, [k.key_id for k in keys[:2]])
    sent = master.oldest_qkd_run(PEER, 5 * 32, 100)
    assert sent is not None
    found = slave.qkd_run("site-a", sent.first_key_id, sent.count)
    assert found is not None and found.digest() == sent.digest()
    assert found.material == sent.material
    master.close()
    slave.close()


def test_a_key_that_does_not_open_in_a_slave_run_is_left_out(store):
    keys = qkd(6)
    store_each(store, keys)
    corrupt(store, keys[2])
    run = store.qkd_run(PEER, raw(keys[0]), 4)
    assert run is not None
    assert run.key_ids == (raw(keys[0]), raw(keys[1]), raw(keys[3]), raw(keys[4]))
    expected = hashlib.sha256(b"".join(raw(k) for k in keys[:4])).digest()
    assert run.digest() != expected  # the master's run: the batch is refused at once
    corrupt(store, keys[3])
    assert store.qkd_run(PEER, raw(keys[3]), 2) is None  # quarantined: not held any more
    assert store.is_qkd_key_consumed(PEER, keys[3].key_id)
    assert store.qkd_key_count(PEER) == 4


# -- consuming a run ------------------------------------------------------------------------


def test_a_run_is_consumed_as_a_range_sealing_again_only_a_frame_it_covers_in_part(store):
    keys = qkd(50)
    for start in range(0, 50, 10):  # five deliveries, five frames
        store.store_qkd_keys(PEER, keys[start : start + 10])
    run = store.oldest_qkd_run(PEER, 35 * 32, 100)
    assert run is not None and run.count == 35
    with statements(store) as seen, store.transaction() as db:
        store._consume_qkd_keys(db, PEER, run)
    writes = [s for s in seen if s.startswith("UPDATE qkd_frames")]
    # Three frames used up whole (no material read or written), one sealed again.
    assert len([s for s in writes if "material=NULL" in s]) == 3
    assert len([s for s in writes if "SET held=" in s and "material=NULL" not in s]) == 1
    assert not [s for s in seen if "qkd_consumed" in s]
    assert held_ids(store) == [k.key_id for k in keys[35:]]
    assert all(store.is_qkd_key_consumed(PEER, k.key_id) for k in keys[:35])
    assert store.qkd_keys_used(PEER) == 35 and store.qkd_key_count(PEER) == 15
    # The used keys of the frame used in part are zeros in its sealed material now.
    first, count, used, ids, sealed = frames(store)[3]
    assert sealed is not None and count == 10
    from qkdd.sealing import qkd_frame_aad

    opened = store.sealer.open(qkd_frame_aad(PEER, first, 32, ids, used), sealed)
    assert opened[: 5 * 32] == bytes(5 * 32)
    assert opened[5 * 32 :] == b"".join(k.material for k in keys[35:40])


def test_consumed_ids_as_bytes_and_keys_not_in_a_run(store):
    keys = qkd(10)
    store.store_qkd_keys(PEER, keys)
    never_held = uuid.uuid4()
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [raw(keys[1]), keys[4].key_id, never_held.bytes])
    assert held_ids(store) == [k.key_id for i, k in enumerate(keys) if i not in (1, 4)]
    assert store.is_qkd_key_consumed(PEER, str(never_held))
    assert store.is_qkd_key_consumed(PEER, keys[1].key_id)
    assert store.qkd_key_count(PEER) == 8
    # A run that is not one any more (a key between is gone) still goes.
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [k.key_id for k in keys[:6]])
    assert held_ids(store) == [k.key_id for k in keys[6:]]


# -- ingest ---------------------------------------------------------------------------------


def test_a_delivery_keeps_new_keys_once_in_order(store):
    keys = qkd(6)
    assert store.store_qkd_keys(PEER, keys[:4]) == 4
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [keys[0].key_id])
    # Re-sent, used, repeated within the delivery: only the new ones count.
    assert store.store_qkd_keys(PEER, [keys[0], keys[1], keys[4], keys[4], keys[5]]) == 2
    assert held_ids(store) == [k.key_id for k in keys[1:]]
    assert store.store_qkd_keys(PEER, []) == 0


def test_key_ids_are_held_in_canonical_form(store):
    key = StoredQkdKey(str(uuid.uuid4()).upper(), os.urandom(32))
    braces = uuid.uuid4()
    store.store_qkd_keys(PEER, [key, StoredQkdKey("{" + str(braces) + "}", os.urandom(32))])
    assert held_ids(store) == [key.key_id.lower(), str(braces)]
    run = store.qkd_run(PEER, uuid.UUID(key.key_id).bytes, 2)
    assert run is not None and run.count == 2 and run.material[:32] == key.material
    with pytest.raises(StoreError):
        store.store_qkd_keys(PEER, [StoredQkdKey("not-a-uuid", b"x" * 32)])


# -- nothing on a hot path sorts or scans the buffer -------------------------------------------


_SCAN = re.compile(r"\bSCAN (qkd_frames|qkd_consumed)\b")


def hot_path(store: KeyStore) -> None:
    """Every operation of the buffer that runs per delivery, per batch or per horizon."""
    keys = qkd(200)
    store.consumed_memory = 8  # forgetting used IDs runs too
    store.store_qkd_keys(PEER, keys[:100])
    store.store_qkd_keys("site-c", qkd(20))
    store.store_qkd_keys(PEER, keys[100:])
    store.qkd_key_count(PEER)
    run = store.oldest_qkd_run(PEER, 20 * 32, 4096)
    assert run is not None
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [str(uuid.UUID(bytes=k)) for k in run.key_ids])
        store.qkd_key_count(PEER)
    slave = store.qkd_run(PEER, raw(keys[30]), 20)
    assert slave is not None
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, slave.key_ids)
    store.quarantine_qkd_keys(PEER, [keys[60].key_id, keys[70].key_id])
    store.quarantine_qkd_keys_before(PEER, [keys[25].key_id])
    store.oldest_qkd_key_ids(PEER, 16)
    store.newest_qkd_key_id(PEER)
    store.get_qkd_keys(PEER, [keys[80].key_id])
    store.is_qkd_key_consumed(PEER, keys[0].key_id)
    listed = [keys[90].key_id, str(uuid.uuid4()), keys[92].key_id]
    store.apply_peer_horizon(PEER, listed, keys[199].key_id)
    store.apply_peer_horizon(PEER, [str(uuid.uuid4())], str(uuid.uuid4()), buffer_full=True)


def frames_read(store: KeyStore, action: Callable[[], object]) -> int:
    """How many statements reading the buffer's frames ``action`` runs."""
    with statements(store) as seen:
        action()
    return sum(1 for sql in seen if sql.startswith("SELECT") and "FROM qkd_frames" in sql)


def frames_of_four(store: KeyStore, frames: int) -> list[StoredQkdKey]:
    keys = qkd(4 * frames)
    for start in range(0, len(keys), 4):
        store.store_qkd_keys(PEER, keys[start : start + 4])
    return keys


def test_a_newest_key_not_arrived_costs_the_same_however_much_is_held(tmp_path):
    """The peer's newest key, when its device is ahead of ours, is nowhere here yet: the
    horizon naming it reads as many frames with 200 frames held as with 4 (the newest are
    looked for in memory only), and a slave retrying a batch whose first key has not
    arrived reads none."""
    reads = [horizon_and_retry_reads(tmp_path, frames) for frames in (4, 200)]
    assert reads[0] == reads[1]


def horizon_and_retry_reads(tmp_path: Path, frames: int) -> int:
    """Frame reads of a horizon whose newest has not arrived, with ``frames`` held."""
    store = KeyStore(tmp_path / f"keys-{frames}.sqlite3", KEK)
    store.consumed_memory = 8  # all but the two newest frames are older than memory
    keys = frames_of_four(store, frames)
    listed = [k.key_id for k in keys[:2]]
    outcome = store.apply_peer_horizon(PEER, listed, str(uuid.uuid4()))
    assert (outcome.dropped, outcome.skip, outcome.unresolved) == (0, (), False)
    reads = frames_read(store, lambda: store.apply_peer_horizon(PEER, listed, str(uuid.uuid4())))
    later = uuid.uuid4()
    assert frames_read(store, lambda: store.qkd_run(PEER, later.bytes, 3, scan=False)) == 0
    assert not store.is_qkd_key_received(PEER, str(later), scan=False)
    assert not store.is_qkd_key_consumed(PEER, str(later), scan=False)
    # Looking everywhere still finds an old key; the newest alone does not.
    assert store.qkd_run(PEER, raw(keys[5]), 3) is not None
    assert store.qkd_run(PEER, raw(keys[5]), 3, scan=False) is None
    assert store.is_qkd_key_received(PEER, keys[5].key_id)
    assert store.is_qkd_key_received(PEER, keys[-1].key_id, scan=False)
    store.close()
    return reads


def test_rule_c_keeps_our_keys_when_the_peers_newest_is_held_older_than_the_memory(store):
    store.consumed_memory = 8
    keys = frames_of_four(store, 10)
    # The peer lists keys we never had, but its newest is one of ours (long ago): it is
    # not new, and our keys stay.
    never = [str(uuid.uuid4())]
    outcome = store.apply_peer_horizon(PEER, never, keys[5].key_id, buffer_full=True)
    assert outcome.dropped == 0 and outcome.anchored
    assert store.qkd_key_count(PEER) == 40
    assert outcome.skip == tuple(never)  # past its newest: never comes here
    # A peer whose keys and newest are nowhere here: rule (c), everything we hold goes.
    others = [str(uuid.uuid4())]
    outcome = store.apply_peer_horizon(PEER, others, str(uuid.uuid4()), buffer_full=True)
    assert outcome.dropped == 40 and store.qkd_key_count(PEER) == 0


def test_no_hot_path_query_sorts_or_scans_the_buffer(store):
    store.store_qkd_keys(PEER, qkd(1))  # the receive-number counter exists from here on
    with statements(store) as seen:
        hot_path(store)
    checked = 0
    for sql in dict.fromkeys(seen):
        if not re.search(r"\b(qkd_frames|qkd_consumed)\b", sql) or sql.startswith("INSERT"):
            continue
        plan = " / ".join(row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql))
        assert "TEMP B-TREE" not in plan, f"{sql}\n  sorts: {plan}"
        assert not _SCAN.search(plan), f"{sql}\n  scans: {plan}"
        checked += 1
    assert checked >= 10


def test_counting_the_buffer_reads_no_table(store):
    store.store_qkd_keys(PEER, qkd(5))
    with statements(store) as seen:
        assert store.qkd_key_count(PEER) == 5
        assert store.qkd_key_count("site-c") == 0
    assert not [s for s in seen if "qkd_frames" in s]


# -- how many keys are buffered: always the table's count ---------------------------------------


def brute_force(store: KeyStore, peer: str = PEER) -> int:
    return len(held_ids(store, peer))


def counts_agree(store: KeyStore) -> None:
    for peer in (PEER, "site-c"):
        assert store.qkd_key_count(peer) == brute_force(store, peer), peer


def test_the_count_follows_every_way_keys_come_and_go(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    keys = qkd(120)
    ids = [k.key_id for k in keys]
    steps: list[tuple[str, Callable[[], object]]] = [
        ("store", lambda: store_each(store, keys[:100])),
        ("store, other peer", lambda: store.store_qkd_keys("site-c", qkd(7))),
        ("store again", lambda: store.store_qkd_keys(PEER, keys[90:110])),
        ("consume a run", lambda: consume(store, keys[:10])),
        ("consume scattered", lambda: consume(store, [keys[20], keys[40], keys[11]])),
        ("quarantine", lambda: store.quarantine_qkd_keys(PEER, [keys[50].key_id])),
        ("drop before", lambda: store.quarantine_qkd_keys_before(PEER, [keys[15].key_id])),
        ("horizon rule (a)", lambda: store.apply_peer_horizon(PEER, [keys[30].key_id], None)),
        (
            "horizon rule (b)",
            lambda: store.apply_peer_horizon(PEER, [str(uuid.uuid4()), keys[35].key_id], None),
        ),
        ("unopened, master", broken(store, keys[36], lambda: store.oldest_qkd_run(PEER, 1, 9))),
        ("unopened mid-run", broken(store, keys[39], lambda: store.oldest_qkd_run(PEER, 999, 9))),
        ("unopened, slave", broken(store, keys[45], lambda: store.qkd_run(PEER, raw(keys[44]), 3))),
        ("unopened by ID", broken(store, keys[46], lambda: store.get_qkd_keys(PEER, ids[46:47]))),
        ("unopened, oldest", broken(store, keys[47], lambda: list(store.oldest_qkd_keys(PEER)))),
        ("store the rest", lambda: store.store_qkd_keys(PEER, keys[110:])),
        (
            "horizon rule (c)",
            lambda: store.apply_peer_horizon(PEER, [str(uuid.uuid4())], None, buffer_full=True),
        ),
    ]
    for name, step in steps:
        step()
        assert store.qkd_key_count(PEER) == brute_force(store), name
        assert store.qkd_key_count("site-c") == brute_force(store, "site-c"), name
    assert store.qkd_key_count(PEER) == 0 and store.qkd_key_count("site-c") == 7
    store.close()


def broken(store: KeyStore, key: StoredQkdKey, read: Callable[[], object]) -> Callable[[], None]:
    """A step: the key's row stops opening, then ``read`` comes across it."""

    def step() -> None:
        corrupt(store, key)
        read()

    return step


def consume(store: KeyStore, keys: list[StoredQkdKey]) -> None:
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [k.key_id for k in keys])


def test_the_count_is_taken_once_when_the_store_opens(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3", KEK)
    store.store_qkd_keys(PEER, qkd(30))
    store.store_qkd_keys("site-c", qkd(4))
    store.close()
    again = KeyStore(tmp_path / "keys.sqlite3", KEK)
    counts_agree(again)
    assert again.qkd_key_count(PEER) == 30
    again.close()


def test_a_rolled_back_transaction_leaves_the_count_alone(store):
    keys = qkd(20)
    store.store_qkd_keys(PEER, keys)
    with pytest.raises(RuntimeError), store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [k.key_id for k in keys[:8]])
        # Inside, the transaction's own changes count.
        assert store.qkd_key_count(PEER) == 12 == brute_force(store)
        raise RuntimeError("the batch could not be stored")
    assert store.qkd_key_count(PEER) == 20 == brute_force(store)
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [k.key_id for k in keys[:8]])
    assert store.qkd_key_count(PEER) == 12 == brute_force(store)


def test_a_row_quarantined_in_a_rolled_back_transaction_is_counted_out_once(store):
    """The quarantine of a row that does not open stands even if the transaction that
    found it rolls back (the store moves the row again)."""
    keys = qkd(6)
    store_each(store, keys)
    corrupt(store, keys[0])
    with pytest.raises(RuntimeError), store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [keys[5].key_id])
        store.oldest_qkd_run(PEER, 32, 1)
        raise RuntimeError("abandoned")
    assert store.quarantined_row_count() == 1
    assert store.qkd_key_count(PEER) == 5 == brute_force(store)


def test_finding_the_oldest_held_key_reads_no_used_frame(store):
    """The slave looks up the first key of the master's run, its own oldest when the
    buffers are in step: frames used up before it (kept as a memory of their IDs) are not
    read, however many there are."""
    store.consumed_memory = 8  # the oldest keys are not in memory any more
    keys = qkd(400)
    for start in range(0, 400, 4):
        store.store_qkd_keys(PEER, keys[start : start + 4])
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [k.key_id for k in keys[:360]])
    with statements(store) as seen:
        run = store.qkd_run(PEER, raw(keys[360]), 8)
    assert run is not None and run.key_ids == tuple(raw(k) for k in keys[360:368])
    scans = [s for s in seen if "key_ids, NULL FROM" in s and "first_seq >" in s]
    assert scans and all("held > 0" in s for s in scans), scans
    assert len(scans) == 1
    # A key used a moment ago is found among the newest used frames first.
    with statements(store) as seen:
        assert store.is_qkd_key_consumed(PEER, keys[359].key_id)
    used_reads = [s for s in seen if "held = 0" in s]
    assert len(used_reads) == 1 and "DESC" in used_reads[0]


def test_an_id_that_never_arrived_reads_no_frame_the_memory_covers(store):
    """The peer's newest key, when its device is ahead, has not arrived here: looking it
    up must not read the buffer's frames (the newest ones are all in memory)."""
    keys = qkd(400)
    for start in range(0, 400, 4):
        store.store_qkd_keys(PEER, keys[start : start + 4])
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, [k.key_id for k in keys[:200]])
    with statements(store) as seen:
        outcome = store.apply_peer_horizon(PEER, [keys[200].key_id], str(uuid.uuid4()))
    assert outcome.anchored and not outcome.unresolved
    scans = [s for s in seen if "key_ids, NULL FROM" in s and ("held = 0" in s or " ASC " in s)]
    # Every frame (from receive number 1 on) is in memory: any read is of an empty range.
    assert all("AND first_seq < 1 " in s for s in scans), scans
    assert not store.is_qkd_key_consumed(PEER, str(uuid.uuid4()))
