"""The key store stays the same size while keys flow: used QKD key IDs and the master's
batch records are forgotten once both sides have moved past them, and a chunk of keys is
gone once its last key is taken. Two LinkAgreements over real SQLite stores (link_pair);
applications take every key as soon as it is ready. And bench/bench_store_size.py's cost
mode runs quickly and measures every operation against the keys held."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from link_pair import LinkPair, qkd_keys
from timeouts import timeout

from qkdd.keystore import KeyStore

KEK = bytes(range(32))
MEMORY = 128  # used IDs remembered at least (the daemon keeps 65,536)
ROUNDS = 60
KEYS_PER_ROUND = 64


@pytest.fixture
def stores(tmp_path):
    a, b = KeyStore(tmp_path / "a.db", KEK), KeyStore(tmp_path / "b.db", KEK)
    for store in (a, b):
        store.consumed_memory = MEMORY
    yield a, b
    a.close()
    b.close()


def rows(store: KeyStore, table: str) -> int:
    return int(store._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def used_id_rows(store: KeyStore) -> int:
    """Rows remembering used QKD key IDs, whatever the table is called."""
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
    return rows(store, "qkd_consumed" if "qkd_consumed" in tables else "consumed_qkd_keys")


def drain(pair: LinkPair) -> int:
    """Both sites' applications take every ready key (A's by enc_keys, then B by ID)."""
    taken = 0
    for master, slave, at_master, at_slave in (
        ("sae-a", "sae-b", pair.a, pair.b),
        ("sae-b", "sae-a", pair.b, pair.a),
    ):
        keys = at_master.take_ready(master, slave, at_master.ready_count(master, slave))
        if keys:
            assert at_slave.take_by_ids(master, slave, [k.key_id for k in keys]) is not None
        taken += len(keys)
    return taken


def test_used_ids_and_batch_records_stay_bounded(stores, backend):
    a, b = stores
    pair = LinkPair(a, b, backend, pool_size=KEYS_PER_ROUND // 2)
    sizes = []
    for round_ in range(ROUNDS):
        pair.feed(qkd_keys(KEYS_PER_ROUND))
        for _ in range(30):
            pair.step()
            pair.now += 0.05
        drain(pair)
        if round_ % 20 == 19:
            pair.new_session()  # a later session settles the last decisions
        sizes.append(
            (
                used_id_rows(a),
                used_id_rows(b),
                rows(a, "batches"),
                rows(b, "batches"),
                rows(a, "key_chunks"),
                rows(b, "key_chunks"),
            )
        )
    used = a.qkd_keys_used("site-b") if hasattr(a, "qkd_keys_used") else sizes[-1][0]
    assert used > 3 * MEMORY  # far more keys went through than are remembered
    late = sizes[ROUNDS // 2 :]
    assert max(s[0] for s in late) <= MEMORY + 2 * KEYS_PER_ROUND, sizes[-1]
    assert max(s[1] for s in late) <= MEMORY + 2 * KEYS_PER_ROUND, sizes[-1]
    assert max(s[2] for s in late) <= 4 and max(s[3] for s in late) <= 4, sizes[-1]
    # Only chunks of batches in flight stay (a block is one or two chunks): an emptied
    # chunk left behind would add one per batch.
    assert max(s[4] for s in late) <= 8 and max(s[5] for s in late) <= 8, sizes[-1]
    # A device re-sending keys it delivered a moment ago is still recognised.
    recent = qkd_keys(4)
    pair.feed(recent)
    for _ in range(30):
        pair.step()
        pair.now += 0.05
    drain(pair)
    assert a.store_qkd_keys("site-b", recent) == 0 and b.store_qkd_keys("site-a", recent) == 0


BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_store_size.py"


def test_bench_cost_mode_measures_each_operation_against_keys_held():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--cost"],
        capture_output=True,
        text=True,
        timeout=timeout(300),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("operation"))
    assert re.findall(r"held ([\d,]+)", header) == ["1,000", "20,000"]
    for operation in ("add_batch 4096 keys", "take_ready 1 key", "take_ready 128 keys"):
        (row,) = [line for line in lines if line.startswith(operation)]
        figures = [float(f) for f in row[30:].split()]
        assert len(figures) == 2 and all(f > 0 for f in figures), done.stdout
    (row,) = [line for line in lines if line.startswith("take_by_ids 1 key")]
    assert all(float(f) > 0 for f in row[30:].split()), done.stdout
