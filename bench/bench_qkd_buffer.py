"""The QKD buffer at device rate: what a delivery, a master's run and a slave's run cost
with few keys buffered and with very many (``qkdd.store.qkd_buffer``). Flat columns are the
point: nothing on these paths may grow with the buffer.

One real SQLite key store (WAL, synchronous=FULL, as the daemon keeps it), 32-byte keys
with random UUIDs. For each buffer size, every figure is the median of several rounds:

- ingest: one 1024-key delivery, stored as the device sink does (``store_qkd_keys``, then
  ``qkd_key_count`` for back-pressure); and, apart, what AES-GCM sealing of those keys
  alone costs (one ``Sealer.seal`` of the delivery's frame, as ``store_qkd_keys`` does);
- master: ``oldest_qkd_run`` of 4096 keys, then their consumption in a transaction (as
  ``add_batch`` consumes a batch's QKD keys);
- slave: ``qkd_run`` of 4096 keys from the oldest key's ID, then their consumption.

"Buffered" counts the keys held besides the ones an operation adds or takes: after each
round the buffer is brought back to that size (untimed).

    python bench/bench_qkd_buffer.py             # 1,000 vs 1,000,000 keys buffered
    python bench/bench_qkd_buffer.py --quick     # 1,000 vs 20,000 (seconds)
    python bench/bench_qkd_buffer.py --keys N [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.sealing import qkd_frame_aad
from qkdd.store.qkd_ids import QkdRun

KEK = bytes(range(32))
PEER = "site-b"
SMALL = 1_000
FULL_KEYS = 1_000_000
QUICK_KEYS = 20_000
DELIVERY = 1024
RUN = 4096
KEY_BYTES = 32
FILL_DELIVERY = 16_384  # deliveries that fill the buffer (untimed) are larger


def fresh(count: int) -> list[StoredQkdKey]:
    return [StoredQkdKey(str(uuid.uuid4()), os.urandom(KEY_BYTES)) for _ in range(count)]


def consume_oldest(store: KeyStore, count: int) -> None:
    ids = store.oldest_qkd_key_ids(PEER, count)
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, ids)


def fill_to(store: KeyStore, keys: int) -> None:
    """Bring the buffer to ``keys`` keys (adding new ones, or using up the oldest)."""
    have = store.qkd_key_count(PEER)
    while have < keys:
        n = min(FILL_DELIVERY, keys - have)
        store.store_qkd_keys(PEER, fresh(n))
        have += n
    if have > keys:
        consume_oldest(store, have - keys)


def measure(store: KeyStore, buffered: int, rounds: int) -> dict[str, float]:
    """Median figures (seconds per key, per call for the count) with ``buffered`` keys held."""
    samples: dict[str, list[float]] = {}
    fill_to(store, buffered)
    for _ in range(rounds):
        for name, value in one_round(store, buffered).items():
            samples.setdefault(name, []).append(value)
    figures = {name: statistics.median(values) for name, values in samples.items()}
    figures["master"] = figures["oldest_run"] + figures["master_consume"]
    figures["slave"] = figures["run_from"] + figures["slave_consume"]
    return figures


def one_round(store: KeyStore, buffered: int) -> dict[str, float]:
    clock = time.perf_counter
    figures: dict[str, float] = {}
    # Ingest: one delivery, as the device sink stores it.
    keys = fresh(DELIVERY)
    start = clock()
    store.store_qkd_keys(PEER, keys)
    store.qkd_key_count(PEER)
    figures["ingest"] = (clock() - start) / DELIVERY
    # Sealing alone, as store_qkd_keys seals the delivery: one frame.
    keys = fresh(DELIVERY)
    sealer = store.sealer
    start = clock()
    ids = b"".join(uuid.UUID(key.key_id).bytes for key in keys)
    aad = qkd_frame_aad(PEER, 1, KEY_BYTES, ids, bytes(DELIVERY // 8))
    sealer.seal(aad, b"".join(key.material for key in keys))
    figures["seal"] = (clock() - start) / DELIVERY
    start = clock()
    for _ in range(1000):
        store.qkd_key_count(PEER)
    figures["count"] = (clock() - start) / 1000

    # Master: the oldest run, consumed as add_batch does.
    fill_to(store, buffered + RUN)
    start = clock()
    run = store.oldest_qkd_run(PEER, RUN * KEY_BYTES, RUN)
    figures["oldest_run"] = (clock() - start) / RUN
    assert run is not None and run.count == RUN
    ids = run
    start = clock()
    consume(store, ids)
    figures["master_consume"] = (clock() - start) / RUN

    # Slave: the run from a given key (the oldest, as a batch names it), consumed.
    fill_to(store, buffered + RUN)
    first = uuid.UUID(store.oldest_qkd_key_ids(PEER, 1)[0]).bytes
    start = clock()
    found = store.qkd_run(PEER, first, RUN)
    figures["run_from"] = (clock() - start) / RUN
    assert found is not None and found.count == RUN
    ids = found
    start = clock()
    consume(store, ids)
    figures["slave_consume"] = (clock() - start) / RUN
    fill_to(store, buffered)
    return figures


def consume(store: KeyStore, ids: QkdRun | list[str]) -> None:
    """As ``add_batch`` consumes a batch's QKD keys: in its transaction."""
    with store.transaction() as db:
        store._consume_qkd_keys(db, PEER, ids)


ROWS: tuple[tuple[str, str, Callable[[dict[str, float]], float], str], ...] = (
    ("ingest, 1024-key delivery", "keys/s", lambda f: 1 / f["ingest"], "{:,.0f}"),
    ("  the delivery per key", "µs/key", lambda f: 1e6 * f["ingest"], "{:,.1f}"),
    ("  of which sealing its frame", "µs/key", lambda f: 1e6 * f["seal"], "{:,.2f}"),
    ("qkd_key_count", "ns/call", lambda f: 1e9 * f["count"], "{:,.0f}"),
    ("oldest_qkd_run, 4096 keys", "µs/key", lambda f: 1e6 * f["oldest_run"], "{:,.2f}"),
    ("  consume the run", "µs/key", lambda f: 1e6 * f["master_consume"], "{:,.2f}"),
    ("master: run + consume", "µs/key", lambda f: 1e6 * f["master"], "{:,.2f}"),
    ("qkd_run, 4096 keys", "µs/key", lambda f: 1e6 * f["run_from"], "{:,.2f}"),
    ("  consume the run", "µs/key", lambda f: 1e6 * f["slave_consume"], "{:,.2f}"),
    ("slave: run + consume", "µs/key", lambda f: 1e6 * f["slave"], "{:,.2f}"),
)


def print_table(sizes: tuple[int, int], results: tuple[dict[str, float], dict[str, float]]) -> None:
    small, big = (f"{n:,} buffered" for n in sizes)
    print(f"{'operation':<28} {'unit':<8} {small:>20} {big:>20} {'ratio':>7}")
    for label, unit, figure, form in ROWS:
        a, b = figure(results[0]), figure(results[1])
        print(f"{label:<28} {unit:<8} {form.format(a):>20} {form.format(b):>20} {b / a:>7.2f}")
    print("ratio: the large buffer's figure over the small one's (1.00: no growth)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_KEYS:,} keys, 3 rounds")
    parser.add_argument("--keys", type=int, help="the large buffer's size")
    parser.add_argument("--rounds", type=int, help="rounds per figure (median; at least 3)")
    args = parser.parse_args()
    big = args.keys or (QUICK_KEYS if args.quick else FULL_KEYS)
    rounds = max(3, args.rounds or (3 if args.quick else 5))
    print(
        f"QKD buffer: medians of {rounds} rounds, {KEY_BYTES}-byte keys, one SQLite store"
        " (WAL, synchronous=FULL)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(Path(tmp) / "keys.sqlite3", KEK)
        started = time.perf_counter()
        small_figures = measure(store, SMALL, rounds)
        big_figures = measure(store, big, rounds)
        store.close()
    print_table((SMALL, big), (small_figures, big_figures))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
