"""Throughput and latency of the ETSI GS QKD 014 API over its Unix socket.

Measures enc_keys and dec_keys (1 and 100 keys per request, or ``--large N``) with 1, 8
and 64 concurrent callers, and beside them a floor measured in the same run: a bare h11
server on the same kind of socket answering every request with a fixed small body. Each
server runs in its own process (as qkdd does); the callers share one Trio process using
`qkdd.client`.

    python bench/bench_etsi014.py [--requests N] [--pool memory|store] [--group-commit]
                                  [--large N] [--held N] [--quick]

``--pool store`` serves from the daemon's real pool (``StoreKeyPool`` over an SQLite
``KeyStore`` with keys sealed at rest), filled beforehand with ready keys; ``memory`` (the
default) from ``MemoryKeyPool``, which measures the API layer alone. The store commits
with an fsync each (as the CLI opens it), or with ``--group-commit`` as the daemon does: no
fsync per commit, and one fdatasync before each answer shared by all the answers waiting
(``qkdd.durability``). The store pool hands keys out as the daemon does: the enc_keys of the
requests ready at one moment share a store transaction (``qkdd.etsi014.hand_outs``).

A second table compares 1-key enc_keys on a server holding 1000 ready keys with one holding
``--held`` (1,000,000 by default): what a hand-out costs should not grow with what is held.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import h11
import trio

from qkdd.client import KeyClient
from qkdd.durability import GroupCommit
from qkdd.etsi014.hand_outs import GatheredHandOuts
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.key_pool import KeyPool
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.unix_socket import serve_unix

MASTER, SLAVE = "SAE-master", "SAE-slave"
_barrier: GroupCommit | None = None  # the store pool's, with --group-commit
_hand_outs: GatheredHandOuts | None = None  # the store pool's, as the daemon's
CONCURRENCY = (1, 8, 64)
FLOOR_BODY = b'{"keys":[]}'


def _large() -> int:
    """Keys per request in the large rows (``--large``; the server child reads it too)."""
    return int(os.environ.get("BENCH_LARGE", "100"))


# -- servers (run in child processes) --


def _store_pool(directory: str, keys: int, collect: bool = True) -> tuple[KeyPool, list[str]]:
    """A StoreKeyPool with ``keys`` ready keys for MASTER -> SLAVE, and (with ``collect``)
    the IDs of as many more that a slave may collect (in a real pair of sites they sit in
    the peer's store)."""
    import base64
    from pathlib import Path

    from qkdd.config import parse_config
    from qkdd.crypto import SIGNATURE_PUBLIC_KEY_SIZE
    from qkdd.key_ids import key_ids, uuid_prefix
    from qkdd.keystore import KeyStore, NewKeyBlock
    from qkdd.store_pool import StoreKeyPool

    config = parse_config(
        Path(directory) / "bench.toml",
        {
            "site_id": "site-a",
            "listen": "127.0.0.1:1",
            "state_directory": directory,
            "identity": {"private_key": "unused"},
            "store": {"key_encryption_key": "unused"},
            "api": {"socket": "unused", "max_keys_per_request": _large()},
            "consumers": [{"sae_id": MASTER}],
            "peers": [
                {
                    "site_id": "site-b",
                    "address": "127.0.0.1:2",
                    "remote_sae_ids": [SLAVE],
                    "public_key": base64.b64encode(bytes(SIGNATURE_PUBLIC_KEY_SIZE)).decode(),
                    "device": {"kind": "serial", "path": "unused"},
                }
            ],
        },
    )
    group_commit = os.environ.get("BENCH_GROUP_COMMIT") == "1"
    store = KeyStore(Path(directory) / "keys.sqlite3", os.urandom(32), group_commit=group_commit)
    dec_ids: list[str] = []
    total, per_block = (2 * keys, 256) if collect else (keys, 4096)
    # Batches of 256 keys (4096 to hold many), each one block under its own ID prefix (as
    # agreement makes them).
    for batch_id, start in enumerate(range(0, total, per_block), start=1):
        count = min(per_block, total - start)
        block = NewKeyBlock(
            uuid_prefix(os.urandom(12)), MASTER, SLAVE, 256, count, os.urandom(32 * count)
        )
        store.add_batch("site-b", batch_id, [block], [])
        store.commit_batch("site-b", batch_id)
        if start >= keys:
            dec_ids += key_ids(block.id_prefix, block.first_index, block.count)

    class Live:
        pass

    live = Live()
    live.config = config  # type: ignore[attr-defined]
    global _barrier, _hand_outs
    _barrier = GroupCommit(store) if group_commit else None
    _hand_outs = GatheredHandOuts(store.handing_out, _barrier)
    return StoreKeyPool(live, store, lambda site: None), dec_ids  # type: ignore[arg-type]


async def _serve_api(path: str, keys: int, collect: bool = True) -> None:
    """Serve ``keys`` keys for enc_keys, and (with ``collect``) as many more for dec_keys
    to collect."""
    pool: KeyPool
    if os.environ.get("BENCH_POOL") == "store":
        pool, dec_ids = _store_pool(os.path.dirname(path), keys, collect)
        with open(path + ".ids", "w") as handle:
            handle.write("\n".join(dec_ids))
    else:
        # The keys dec_keys collects are handed out to the master from this pool first.
        total = 2 * keys if collect else keys
        pool = MemoryKeyPool([MASTER, SLAVE], max_key_per_request=_large(), max_key_count=total)
        pool.fill(MASTER, SLAVE, total)
    both = frozenset({MASTER, SLAVE})
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_unix,
                path,
                RequestHandler(pool, hand_outs=_hand_outs),
                lambda uid, gid: both,
                before_send=_barrier.durable if _barrier is not None else None,
            )
        )
        print("ready", flush=True)


async def _serve_floor(path: str) -> None:
    async def connection(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.EndOfMessage):
                await stream.send_all(
                    conn.send(
                        h11.Response(
                            status_code=200,
                            headers=[
                                ("content-type", "application/json"),
                                ("content-length", str(len(FLOOR_BODY))),
                            ],
                        )
                    )
                    + conn.send(h11.Data(data=FLOOR_BODY))
                    + conn.send(h11.EndOfMessage())
                )
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(128)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, connection, [listener])
        print("ready", flush=True)


def _start(kind: str, path: str, keys: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        # The child parses its own arguments: it must be told the pool and options too.
        [
            sys.executable,
            __file__,
            "--serve",
            kind,
            path,
            str(keys),
            "--pool",
            os.environ["BENCH_POOL"],
            "--large",
            os.environ["BENCH_LARGE"],
            *(["--group-commit"] if os.environ["BENCH_GROUP_COMMIT"] == "1" else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline() != "ready\n":
        raise SystemExit(f"the {kind} server did not start")
    return proc


# -- load --

Call = Callable[[KeyClient, int], Awaitable[object]]


async def _run(
    path: str, sae: str, concurrency: int, requests: int, call: Call
) -> tuple[float, list[float]]:
    """Run `requests` calls spread over `concurrency` callers; (requests/s, latencies in s)."""
    latencies: list[float] = []
    per_caller = requests // concurrency

    async def caller(index: int) -> None:
        async with KeyClient(path, sae_id=sae) as client:
            await call(client, index * per_caller)  # connect and warm up, untimed
            for i in range(1, per_caller):
                start = time.perf_counter()
                await call(client, index * per_caller + i)
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(caller, index)
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies


async def _floor_call(client: KeyClient, _: int) -> object:
    return await client.request("GET", "/floor", None)


def _enc_call(number: int) -> Call:
    async def call(client: KeyClient, _: int) -> object:
        return await client.enc_keys(SLAVE, number=number)

    return call


def _dec_call(key_ids: list[str], per_request: int) -> Call:
    async def call(client: KeyClient, index: int) -> object:
        ids = key_ids[index * per_request : (index + 1) * per_request]
        return await client.dec_keys(MASTER, ids)

    return call


async def _collectable_ids(api_path: str, count: int, used: int) -> list[str]:
    """``count`` key IDs a slave may collect, none used before: with the store pool from the
    list the server wrote; with the memory pool handed out to the master now."""
    if os.path.exists(api_path + ".ids"):
        with open(api_path + ".ids") as handle:
            return handle.read().split()[used : used + count]
    ids: list[str] = []
    async with KeyClient(api_path, sae_id=MASTER) as master:
        while len(ids) < count:
            ids += [k.key_id for k in await master.enc_keys(SLAVE, number=_large())]
    return ids[:count]


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0]


Row = tuple[str, int, float, list[float], float, list[float]]
# With how many keys held the held rows compare 1-key hand-outs (beside ``--held``).
FEW_HELD = 1000
HELD_CONCURRENCY = (1, 8)


async def _held_rows(requests: int, held: int) -> list[tuple[int, list[float], list[float]]]:
    """1-key enc_keys against a server holding FEW_HELD ready keys and one holding ``held``
    (both topped up with the keys the calls take): (callers, latencies few, latencies many)."""
    taken = requests * len(HELD_CONCURRENCY) + max(HELD_CONCURRENCY)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # A directory each: a server keeps its store beside its socket.
        few_path, many_path = os.path.join(tmp, "few.sock"), os.path.join(tmp, "many", "s.sock")
        os.mkdir(os.path.dirname(many_path))
        servers = []
        try:
            servers.append(_start("held", few_path, FEW_HELD + taken))
            servers.append(_start("held", many_path, held + taken))
            for concurrency in HELD_CONCURRENCY:
                _, few = await _run(few_path, MASTER, concurrency, requests, _enc_call(1))
                _, many = await _run(many_path, MASTER, concurrency, requests, _enc_call(1))
                rows.append((concurrency, few, many))
        finally:
            for server in servers:
                server.terminate()
                server.wait()
    return rows


async def _bench(requests: int) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        api_path, floor_path = os.path.join(tmp, "api.sock"), os.path.join(tmp, "floor.sock")
        # Enough keys for every enc_keys request below, and as many again for dec_keys
        # (the margin covers collectable IDs fetched in whole large requests).
        large = _large()
        keys = requests * len(CONCURRENCY) * (1 + large) + 10 * large
        servers = []
        used = 0  # IDs handed to dec_keys so far
        try:
            servers.append(_start("api", api_path, keys))
            servers.append(_start("floor", floor_path, 0))
            for concurrency in CONCURRENCY:
                floor_rate, floor_lat = await _run(
                    floor_path, MASTER, concurrency, requests, _floor_call
                )
                for label, number in (("enc_keys x1", 1), (f"enc_keys x{large}", large)):
                    rate, lat = await _run(
                        api_path, MASTER, concurrency, requests, _enc_call(number)
                    )
                    rows.append((label, concurrency, rate, lat, floor_rate, floor_lat))
                # Keys for the slave to collect, handed out to the master beforehand.
                for label, number in (("dec_keys x1", 1), (f"dec_keys x{large}", large)):
                    ids = await _collectable_ids(api_path, requests * number, used)
                    used += len(ids)
                    rate, lat = await _run(
                        api_path, SLAVE, concurrency, requests, _dec_call(ids, number)
                    )
                    rows.append((label, concurrency, rate, lat, floor_rate, floor_lat))
        finally:
            for server in servers:
                server.terminate()
                server.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per cell (default 2000)")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--pool",
        choices=("memory", "store"),
        default="memory",
        help="the pool behind the API (default: memory)",
    )
    parser.add_argument(
        "--group-commit",
        action="store_true",
        help="with --pool store: commit as the daemon does (one shared fdatasync per answer)",
    )
    parser.add_argument("--large", type=int, default=100, help="keys per large request")
    parser.add_argument(
        "--held",
        type=int,
        default=1_000_000,
        help=f"ready keys held, compared with {FEW_HELD} (default 1000000; quick: 20000)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the fewest requests per cell (a smoke test)"
    )
    args = parser.parse_args()
    if args.quick:
        args.requests = max(CONCURRENCY) * 4  # the fewest that give every caller a few
        args.held = min(args.held, 20_000)
    os.environ["BENCH_POOL"] = args.pool  # the server child reads these
    os.environ["BENCH_LARGE"] = str(args.large)
    os.environ["BENCH_GROUP_COMMIT"] = "1" if args.group_commit else "0"
    if args.serve:
        kind, path, keys = args.serve
        if kind == "floor":
            trio.run(_serve_floor, path)
        else:
            trio.run(_serve_api, path, int(keys), kind == "api")
        return
    requests = max(args.requests, max(CONCURRENCY) * 4)
    rows = trio.run(_bench, requests)
    held_rows = trio.run(_held_rows, requests, args.held)
    print(
        f"ETSI 014 over a Unix socket ({args.pool} pool"
        f"{', group commit' if args.group_commit and args.pool == 'store' else ''}), "
        f"{requests} requests per cell, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'workload':<14} {'callers':>7} {'req/s':>9} {'keys/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'floor req/s':>11} {'floor p99':>9} {'ratio':>6} {'p99/floor':>9}"
    )
    for label, concurrency, rate, lat, floor_rate, floor_lat in rows:
        keys = rate * int(label.rsplit("x", 1)[1])
        print(
            f"{label:<14} {concurrency:>7} {rate:>9.0f} {keys:>9.0f} {_pct(lat, 50):>8.2f} "
            f"{_pct(lat, 99):>8.2f} {floor_rate:>11.0f} {_pct(floor_lat, 99):>9.2f} "
            f"{rate / floor_rate:>6.2f} {_pct(lat, 99) / _pct(floor_lat, 99):>9.2f}"
        )
    print()
    print(f"enc_keys x1 with {FEW_HELD} and with {args.held} ready keys held ({args.pool} pool)")
    print(
        f"{'callers':>7} {'p50 ms few':>10} {'p50 ms many':>11} {'ratio':>6} "
        f"{'p99 ms few':>10} {'p99 ms many':>11} {'ratio':>6}"
    )
    for concurrency, few, many in held_rows:
        print(
            f"{concurrency:>7} {_pct(few, 50):>10.2f} {_pct(many, 50):>11.2f} "
            f"{_pct(many, 50) / _pct(few, 50):>6.2f} {_pct(few, 99):>10.2f} "
            f"{_pct(many, 99):>11.2f} {_pct(many, 99) / _pct(few, 99):>6.2f}"
        )


if __name__ == "__main__":
    main()
