"""Size of a site's key store after N keys, and the cost of its operations against how
many keys it holds.

Size (the default): bytes on disk and rows per table, at the link master (A) and the slave
(B), as the count grows.

Both sites' key agreement runs in this process: two LinkAgreements, each over its own real
SQLite store (as the daemons keep them), exchange every message through its encoding; both
devices deliver the same QKD keys, and the applications at both sites take every hybrid
key as soon as it is ready (A by enc_keys, B by ID). What is left in the store is what a
long-running daemon carries: the QKD buffer, the used-ID memory (65,536 IDs per peer by
default), batch records, counters. A flat row count after the memory is full is the point.

    python bench/bench_store_size.py            # quick: 20,000 keys
    python bench/bench_store_size.py --full     # 10,000,000 keys (hours: see --keys)
    python bench/bench_store_size.py --keys N [--memory M] [--checkpoints K]

Cost (``--cost``): one store (as a daemon keeps it: WAL, synchronous=FULL, secure_delete,
keys sealed in chunks) filled with ready 256-bit keys in blocks of 4096, then timed:
storing a batch of one 4096-key block (add_batch, µs per key; the batch is aborted after),
taking 1 and 128 of the oldest ready keys (take_ready, µs per request), taking one key by
ID (take_by_ids, a random held key), and newest_ready_at; with 1,000 keys held and with
20,000 (quick) or 1,000,000 (``--full``). What the takes use up is put back (untimed) as
they go, so the store holds between N and N + min(N, 4096) keys. Each figure is the median
of the runs' means; every commit is a durable fsync, so the disk under ``--dir`` matters.

    python bench/bench_store_size.py --cost [--full] [--runs R] [--dir D]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from qkdd.crypto.select import select_backend
from qkdd.key_ids import key_id, uuid_prefix
from qkdd.keystore import KeyStore, NewKeyBlock, StoredQkdKey
from qkdd.link_params import LinkParameters
from qkdd.peer.agreement import LinkAgreement
from qkdd.peer.agreement_messages import LinkMessage, decode_message
from qkdd.store.qkd_lookup import CONSUMED_MEMORY

QUICK_KEYS = 20_000
FULL_KEYS = 10_000_000
POOL = 256  # one full batch per refill
KEYS_PER_FEED = 512  # QKD keys the devices deliver between two rounds
KEK = bytes(range(32))
TABLES = (
    "qkd_frames",
    "qkd_consumed",
    "batches",
    "key_chunks",
    "auth_keys",
    "pad_keys",
    "assigned_keys",
    "counters",
    "meta",
)


class Link:
    """Two sites, one session at a time, a simulated clock."""

    def __init__(self, directory: Path, memory: int) -> None:
        self.a = KeyStore(directory / "a" / "keys.sqlite3", KEK)
        self.b = KeyStore(directory / "b" / "keys.sqlite3", KEK)
        for store in (self.a, self.b):
            store.consumed_memory = memory
        self.backend = select_backend("auto")
        self.now = 0.0
        self.session = 0
        self.new_session()

    def new_session(self) -> None:
        self.session += 1
        session_id = self.session.to_bytes(32, "big")
        self.master = LinkAgreement(
            self._params("site-a", "site-b"),
            store=self.a,
            backend=self.backend,
            session_id=session_id,
        )
        self.slave = LinkAgreement(
            self._params("site-b", "site-a"),
            store=self.b,
            backend=self.backend,
            session_id=session_id,
        )
        self.to_b: list[LinkMessage] = self.master.start(self.now)
        self.to_a: list[LinkMessage] = self.slave.start(self.now)

    @staticmethod
    def _params(local: str, peer: str) -> LinkParameters:
        saes = {"site-a": "sae-a", "site-b": "sae-b"}
        return LinkParameters(
            local, peer, frozenset({saes[local]}), frozenset({saes[peer]}), 256, POOL
        )

    def step(self) -> None:
        self.to_b += self.master.poll(self.now)
        self.to_a += self.slave.poll(self.now)
        to_a, self.to_a = self.to_a, []
        for m in to_a:
            self.to_b += self.master.on_message(decode_message(m.encode()), self.now)
        to_b, self.to_b = self.to_b, []
        for m in to_b:
            self.to_a += self.slave.on_message(decode_message(m.encode()), self.now)
        self.now += 0.01

    def feed(self, count: int) -> None:
        keys = [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(count)]
        self.a.store_qkd_keys("site-b", keys)
        self.b.store_qkd_keys("site-a", keys)

    def drain(self) -> int:
        taken = 0
        for master, slave, here, there in (
            ("sae-a", "sae-b", self.a, self.b),
            ("sae-b", "sae-a", self.b, self.a),
        ):
            keys = here.take_ready(master, slave, here.ready_count(master, slave))
            if keys:
                there.take_by_ids(master, slave, [k.key_id for k in keys])
            taken += len(keys)
        return taken


def store_bytes(store: KeyStore) -> int:
    """Database file plus its WAL, after a checkpoint (what the store occupies on disk)."""
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path = store.path
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def rows(store: KeyStore) -> dict[str, int]:
    return {t: int(store._db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}


def run(keys: int, memory: int, checkpoints: int) -> list[tuple[int, float, dict[str, object]]]:
    """Agree ``keys`` hybrid keys (both directions together); a row of figures at each
    checkpoint."""
    marks = [keys * (i + 1) // checkpoints for i in range(checkpoints)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        link = Link(Path(tmp), memory)
        made = 0
        started = time.perf_counter()
        idle = 0
        while marks:
            if link.a.qkd_key_count("site-b") < 2 * POOL:
                link.feed(KEYS_PER_FEED)
            link.step()
            got = link.drain()
            made += got
            idle = 0 if got else idle + 1
            if idle > 2000:
                raise SystemExit(f"no key for 2000 rounds at {made} keys: the link is stuck")
            if made // 50_000 != (made - got) // 50_000:
                link.new_session()  # sessions end now and then, as they do in a daemon
            if made >= marks[0]:
                marks.pop(0)
                figures = {
                    "a_bytes": store_bytes(link.a),
                    "b_bytes": store_bytes(link.b),
                    "a_rows": rows(link.a),
                    "b_rows": rows(link.b),
                }
                results.append((made, time.perf_counter() - started, figures))
        link.a.close()
        link.b.close()
    return results


def print_table(results: list[tuple[int, float, dict[str, object]]]) -> None:
    short = {
        "qkd_frames": "frames",
        "qkd_consumed": "used",
        "batches": "batch",
        "key_chunks": "chunks",
        "auth_keys": "auth",
        "counters": "ctr",
    }
    header = (
        f"{'keys':>10} {'site':>4} {'bytes':>11} {'B/key':>7} "
        + " ".join(f"{name:>7}" for name in short.values())
        + f" {'wall_s':>8}"
    )
    print(header)
    for made, wall, figures in results:
        for site in ("a", "b"):
            size = int(figures[f"{site}_bytes"])  # type: ignore[call-overload]
            table_rows: dict[str, int] = figures[f"{site}_rows"]  # type: ignore[assignment]
            print(
                f"{made:>10,} {site.upper():>4} {size:>11,} {size / made:>7.2f} "
                + " ".join(f"{table_rows[t]:>7,}" for t in short)
                + f" {wall:>8.1f}"
            )


# -- cost against keys held ------------------------------------------------------------------

COST_BLOCK = 4096  # keys per block, as agreement makes them
COST_KEY_BITS = 256
COST_HELD_QUICK = (1_000, 20_000)
COST_HELD_FULL = (1_000, 1_000_000)
COST_PAIR = ("sae-a", "sae-b")
# Operations timed per run of each measurement (add_batch: blocks stored).
COST_OPS = {"add_batch": 3, "take_ready 1": 100, "take_ready 128": 20, "take_by_ids 1": 100}


class HeldStore:
    """A store holding about ``held`` ready keys of one pair, in blocks of COST_BLOCK."""

    def __init__(self, directory: Path, held: int) -> None:
        self.store = KeyStore(directory / "keys.sqlite3", KEK)
        self.held = held
        self.blocks: list[NewKeyBlock] = []  # every block made ready, for IDs to ask for
        self.picked: set[str] = set()  # IDs asked for already
        self.batch = 0
        self.refill()

    def block(self, count: int) -> NewKeyBlock:
        return NewKeyBlock(
            uuid_prefix(os.urandom(12)),
            *COST_PAIR,
            COST_KEY_BITS,
            count,
            os.urandom(count * COST_KEY_BITS // 8),
        )

    def refill(self) -> None:
        """Back to at least ``held`` ready keys (what a run took, in blocks of at most 4096)."""
        while (short := self.held - self.store.ready_count(*COST_PAIR)) > 0:
            block = self.block(min(COST_BLOCK, max(short, min(COST_BLOCK, self.held))))
            self.batch += 1
            self.store.add_batch("site-b", self.batch, [block], [])
            self.store.commit_batch("site-b", self.batch)
            self.blocks.append(block)

    def random_held_ids(self, count: int) -> list[str]:
        """IDs of ``count`` held keys picked at random, never picked before. Picked among
        the newest blocks that together hold no more keys than are ready: take_ready takes
        the oldest keys first, so it has not reached those yet."""
        ready = self.store.ready_count(*COST_PAIR)
        recent: list[NewKeyBlock] = []
        total = 0
        for block in reversed(self.blocks):
            if total + block.count > ready:
                break
            recent.append(block)
            total += block.count
        ids: list[str] = []
        while len(ids) < count:
            pick = random.randrange(total)
            for block in recent:
                if pick < block.count:
                    text = key_id(block.id_prefix, block.first_index + pick)
                    if text not in self.picked:
                        self.picked.add(text)
                        ids.append(text)
                    break
                pick -= block.count
        return ids


def measure_held(directory: Path, held: int, runs: int) -> dict[str, float]:
    """Median over ``runs`` of each operation's mean cost in µs (add_batch: per key)."""
    target = HeldStore(directory, held)
    store = target.store
    figures: dict[str, list[float]] = {name: [] for name in COST_OPS}
    for _ in range(runs):
        spent = 0.0
        for _ in range(COST_OPS["add_batch"]):
            target.batch += 1
            block = target.block(COST_BLOCK)
            started = time.perf_counter()
            store.add_batch("site-b", target.batch, [block], [])
            spent += time.perf_counter() - started
            store.abort_batch("site-b", target.batch)  # the store keeps holding ``held``
        figures["add_batch"].append(spent / (COST_OPS["add_batch"] * COST_BLOCK) * 1e6)
        spent = 0.0
        for wanted in target.random_held_ids(COST_OPS["take_by_ids 1"]):
            started = time.perf_counter()
            got = store.take_by_ids(*COST_PAIR, [wanted])
            spent += time.perf_counter() - started
            if got is None:
                raise SystemExit(f"bench_store_size: key {wanted} was not handed out")
        figures["take_by_ids 1"].append(spent / COST_OPS["take_by_ids 1"] * 1e6)
        for name, number in (("take_ready 1", 1), ("take_ready 128", 128)):
            spent = 0.0
            for _ in range(COST_OPS[name]):
                target.refill()
                started = time.perf_counter()
                got = store.take_ready(*COST_PAIR, number)
                spent += time.perf_counter() - started
                if len(got) != number:
                    raise SystemExit(f"bench_store_size: take_ready({number}) was short")
            figures[name].append(spent / COST_OPS[name] * 1e6)
        target.refill()
    newest = []
    for _ in range(101):
        started = time.perf_counter()
        store.newest_ready_at(*COST_PAIR)
        newest.append(time.perf_counter() - started)
    store.close()
    medians = {name: statistics.median(values) for name, values in figures.items()}
    medians["newest_ready_at"] = statistics.median(newest) * 1e6
    return medians


COST_ROWS = (
    ("add_batch", f"add_batch {COST_BLOCK} keys (µs/key)"),
    ("take_ready 1", "take_ready 1 key (µs/req)"),
    ("take_ready 128", "take_ready 128 keys (µs/req)"),
    ("take_by_ids 1", "take_by_ids 1 key (µs/req)"),
    ("newest_ready_at", "newest_ready_at (µs)"),
)


def run_cost(held_counts: tuple[int, ...], runs: int, directory: str | None) -> None:
    results = {}
    for held in held_counts:
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            started = time.perf_counter()
            results[held] = measure_held(Path(tmp), held, runs)
            print(f"held {held:,}: measured in {time.perf_counter() - started:.1f} s")
    print(
        f"{COST_KEY_BITS}-bit keys of one pair, blocks of {COST_BLOCK}; median of {runs} runs;"
        f" store under {directory or tempfile.gettempdir()}"
    )
    print(f"{'operation':<30}" + "".join(f"{f'held {held:,}':>16}" for held in held_counts))
    for name, label in COST_ROWS:
        print(f"{label:<30}" + "".join(f"{results[held][name]:>16.2f}" for held in held_counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cost", action="store_true", help="time the store's operations against keys held"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--full",
        action="store_true",
        help=f"{FULL_KEYS:,} keys; with --cost, {COST_HELD_FULL[-1]:,} keys held",
    )
    size.add_argument("--keys", type=int, help=f"this many keys (default {QUICK_KEYS:,})")
    parser.add_argument(
        "--memory",
        type=int,
        default=CONSUMED_MEMORY,
        help=f"used QKD key IDs remembered per peer (default, as the daemon: {CONSUMED_MEMORY:,})",
    )
    parser.add_argument("--checkpoints", type=int, default=4, help="rows printed (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="--cost: runs per figure (default 3)")
    parser.add_argument("--dir", help="--cost: where the store lives (default: the temp dir)")
    args = parser.parse_args(argv)
    if args.cost:
        if args.runs < 1 or args.keys is not None:
            print("bench_store_size: --cost takes --runs (positive), not --keys", file=sys.stderr)
            return 2
        run_cost(COST_HELD_FULL if args.full else COST_HELD_QUICK, args.runs, args.dir)
        return 0
    keys = FULL_KEYS if args.full else (args.keys or QUICK_KEYS)
    if keys < 1 or args.memory < 1 or args.checkpoints < 1:
        print(
            "bench_store_size: --keys, --memory and --checkpoints must be positive", file=sys.stderr
        )
        return 2
    print(f"{keys:,} keys, used-ID memory {args.memory:,} per peer, pool {POOL}")
    print_table(run(keys, args.memory, args.checkpoints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
