"""Size of a site's key store after N keys: bytes on disk and rows per table, at the link
master (A) and the slave (B), as the count grows.

Both sites' key agreement runs in this process: two LinkAgreements, each over its own real
SQLite store (as the daemons keep them), exchange every message through its encoding; both
devices deliver the same QKD keys, and the applications at both sites take every hybrid
key as soon as it is ready (A by enc_keys, B by ID). What is left in the store is what a
long-running daemon carries: the QKD buffer, the used-ID memory (65,536 IDs per peer by
default), batch records, counters. A flat row count after the memory is full is the point.

    python bench/bench_store_size.py            # quick: 20,000 keys
    python bench/bench_store_size.py --full     # 10,000,000 keys (hours: see --keys)
    python bench/bench_store_size.py --keys N [--memory M] [--checkpoints K]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from qkdd.crypto.select import select_backend
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link import LinkAgreement, LinkParameters
from qkdd.peer.messages import LinkMessage, decode_message
from qkdd.qkd_buffer import CONSUMED_MEMORY

QUICK_KEYS = 20_000
FULL_KEYS = 10_000_000
POOL = 256  # one full batch per refill
KEYS_PER_FEED = 512  # QKD keys the devices deliver between two rounds
KEK = bytes(range(32))
TABLES = (
    "qkd_keys",
    "qkd_consumed",
    "batches",
    "hybrid_keys",
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
        "qkd_keys": "qkd",
        "qkd_consumed": "used",
        "batches": "batch",
        "hybrid_keys": "hybrid",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help=f"{FULL_KEYS:,} keys")
    size.add_argument("--keys", type=int, help=f"this many keys (default {QUICK_KEYS:,})")
    parser.add_argument(
        "--memory",
        type=int,
        default=CONSUMED_MEMORY,
        help=f"used QKD key IDs remembered per peer (default, as the daemon: {CONSUMED_MEMORY:,})",
    )
    parser.add_argument("--checkpoints", type=int, default=4, help="rows printed (default 4)")
    args = parser.parse_args(argv)
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
