"""Secure messages between two real sites: throughput, latency and QKD bits per message.

Starts the emulated BB84 link and both site daemons as subprocesses (as `qkdd demo` does),
then sends messages of 64 bytes and 64 KiB from site A's application to site B's, with 1 and
8 concurrent senders. A send returns once site B has stored the message, so its latency is
the whole path: A's API, sealing under a fresh hybrid key, the peer session, B's store. The
floor, measured in the same run on the same socket, is the cheapest API round trip the daemon
serves (the ETSI Status call), one caller.

Each hybrid message uses one hybrid key; the table also shows the QKD bits that cost,
measured from the sites' own counters (QKD keys consumed per hybrid key made, times the QKD
key size). One-time-pad messages (64 bytes, 1 sender) use whole pads of raw QKD material:
their cost is read from the sending daemon's log (pads per message, times the pad size).
Messages can be sent only as fast as the link makes hybrid keys: when the stock is empty a
send gets 503 and is retried with the same message ID (counted in "retries").

    python bench/bench_messages.py [--messages N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from qkdd.client import BlockingKeyClient, KeyServiceClientError
from qkdd.demo import running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B

SIZES = (64, 64 * 1024)
SENDERS = (1, 8)


OTP_MESSAGES = 100
PAD_BYTES = 1024  # qkdd.peer.agreement.PAD_BITS_MAX / 8
FULL_POOL = 1000  # keys ready before the floor is measured


def _bigger_pools(otp_messages: int) -> Callable[[Path], None]:
    """Edits the demo's configs: a key pool of 1024 and a pad stock for the OTP messages."""

    def edit(directory: Path) -> None:
        for name in ("site-a.toml", "site-b.toml"):
            path = directory / name
            stock = "pool_size = 1024"
            if name == "site-a.toml":
                stock += f"\notp_pad_bytes = {otp_messages * PAD_BYTES}"
            path.write_text(path.read_text().replace("pool_size = 64", stock))

    return edit


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0]


def _floor(socket_path: str, requests: int) -> tuple[float, list[float]]:
    latencies = []
    with BlockingKeyClient(socket_path) as client:
        client.status(SITE_B.sae_id)
        start = time.perf_counter()
        for _ in range(requests):
            t = time.perf_counter()
            client.status(SITE_B.sae_id)
            latencies.append(time.perf_counter() - t)
        return requests / (time.perf_counter() - start), latencies


def _send(
    socket_path: str, size: int, messages: int, senders: int, protection: str = "hybrid"
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    retries = [0]
    body = os.urandom(size)

    def sender(count: int) -> None:
        with BlockingKeyClient(socket_path, timeout=30) as client:
            for _ in range(count):
                message_id = str(uuid.uuid4())
                t = time.perf_counter()
                while True:
                    try:
                        client.send_message(
                            SITE_B.sae_id, body, message_id=message_id, protection=protection
                        )
                        break
                    except KeyServiceClientError as exc:
                        if exc.status != 503:
                            raise
                        retries[0] += 1
                        time.sleep(0.01)
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=sender, args=(messages // senders,)) for _ in range(senders)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - start), latencies, retries[0]


def _drain(socket_path: str) -> int:
    count = 0
    with BlockingKeyClient(socket_path, timeout=30) as client:
        while (message := client.receive_message(wait=0.5)) is not None:
            client.acknowledge_message(message.message_id)
            count += 1
    return count


def _qkd_bits_per_hybrid_key(state: Path, pads_used: int) -> float:
    """QKD bits consumed per hybrid key made at this site, from its store: QKD keys consumed,
    less those that went into authentication keys and one-time pads (the pads still held
    plus ``pads_used``), over hybrid keys made."""
    db = sqlite3.connect(f"file:{state / 'keys.sqlite3'}?mode=ro", uri=True)
    try:
        consumed = sum(
            int(v) for (v,) in db.execute("SELECT value FROM counters WHERE name LIKE 'used:%'")
        )
        made = sum(
            int(v) for (v,) in db.execute("SELECT value FROM counters WHERE name LIKE 'made:%'")
        )
        auth = db.execute("SELECT count(*) FROM auth_keys").fetchone()[0]
        pads_held = db.execute("SELECT count(*) FROM pad_keys").fetchone()[0]
        # Any frame of the QKD buffer gives the key size.
        row = db.execute("SELECT key_size FROM qkd_frames LIMIT 1").fetchone()
    finally:
        db.close()
    qkd_bits = row[0] * 8 if row else 256
    pad_qkd_keys = (pads_held + pads_used) * PAD_BYTES * 8 // qkd_bits
    # Authentication keys (one per session) use QKD keys too: one 256-bit key each, and
    # only the newest is kept, so this slightly overstates the hybrid share.
    return (consumed - auth - pad_qkd_keys) * qkd_bits / max(made, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=800, help="per cell (default 800)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few messages per cell, no full pool first (a smoke test)",
    )
    args = parser.parse_args()
    otp_messages, full_pool, floor_requests = OTP_MESSAGES, FULL_POOL, 500
    if args.quick:
        args.messages, otp_messages, full_pool, floor_requests = 16, 4, 16, 100
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_demo(Path(tmp), _bigger_pools(otp_messages)) as sites,
    ):
        site_a, site_b = sites
        # A full pool first: the floor is measured while the daemon is otherwise idle.
        wait_for_keys(site_a, SITE_B.sae_id, full_pool, timeout=180)
        a_sock, b_sock = str(site_a.socket_path), str(site_b.socket_path)
        floor_rate, floor_lat = _floor(a_sock, floor_requests)
        for size in SIZES:
            for senders in SENDERS:
                rate, lat, retries = _send(a_sock, size, args.messages, senders)
                received = _drain(b_sock)
                rows.append((size, senders, rate, lat, retries, received))
        # One-time pads: wait for the stock, then send one message per pad.
        with BlockingKeyClient(a_sock) as client:
            deadline = time.monotonic() + 300
            while client.site_status()["peers"][SITE_B.site_id]["otp_pad_bytes_ready"] < (
                otp_messages * PAD_BYTES
            ):
                assert time.monotonic() < deadline, "the pad stock did not fill"
                time.sleep(0.1)
        otp_rate, otp_lat, otp_retries = _send(a_sock, 64, otp_messages, 1, "otp")
        otp_received = _drain(b_sock)
        log = site_a.log_file.read_text()
        pads = [
            int(line.rsplit("keys=", 1)[1])
            for line in log.splitlines()
            if "event=message_sent" in line and "protection=otp" in line
        ]
        bits = _qkd_bits_per_hybrid_key(Path(tmp) / SITE_A.directory / "state", sum(pads))

    print(
        f"Messages site A -> site B (real daemons, emulated BB84 link), {args.messages} per "
        f"cell, python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    print(
        f"floor (ETSI Status round trip, same socket): {floor_rate:.0f} req/s, "
        f"p50 {_pct(floor_lat, 50):.2f} ms, p99 {_pct(floor_lat, 99):.2f} ms"
    )
    print(
        f"{'size':>7} {'senders':>7} {'msg/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'ratio':>6} {'p50/floor':>9} {'retries':>7} {'received':>8}"
    )
    for size, senders, rate, lat, retries, received in rows:
        print(
            f"{size:>7} {senders:>7} {rate:>7.0f} {_pct(lat, 50):>8.2f} {_pct(lat, 99):>8.2f} "
            f"{rate / floor_rate:>6.3f} {_pct(lat, 50) / _pct(floor_lat, 50):>9.1f} "
            f"{retries:>7} {received:>8}"
        )
    print(
        f"{'64 otp':>7} {1:>7} {otp_rate:>7.0f} {_pct(otp_lat, 50):>8.2f} "
        f"{_pct(otp_lat, 99):>8.2f} {otp_rate / floor_rate:>6.3f} "
        f"{_pct(otp_lat, 50) / _pct(floor_lat, 50):>9.1f} {otp_retries:>7} {otp_received:>8}"
    )
    otp_bits = sum(pads) * PAD_BYTES * 8 / max(len(pads), 1)
    print(
        f"QKD bits per message: hybrid {bits:.0f} (one hybrid key per message, any size); "
        f"one-time pad {otp_bits:.0f} for 64 bytes (whole {PAD_BYTES * 8}-bit pads covering "
        f"the 256-bit MAC key and the body; a message of n bytes takes "
        f"ceil((n + 32) / {PAD_BYTES}) pads)"
    )


if __name__ == "__main__":
    main()
