"""Peer protocol cost: handshake latency beside its bare primitives, and the key-agreement
rate, sans-IO and between two real daemons, beside floors measured in the same run.

1. Handshakes, bootstrap (mode 1, ML-DSA-65) and PSK (mode 2): two ``PeerConnection``s in
   memory (sans-IO) and over a real TCP connection on loopback with Trio
   (``qkdd.peering.complete_handshake``), p50 and p99 over N runs, for each available PQC
   backend. The primitives column is the sum of the medians of what a handshake must
   compute: ML-KEM-768 keygen + encapsulate + decapsulate, two X25519 shares and
   exchanges, every HMAC-SHA256 (counted in a real handshake), and in mode 1 two ML-DSA-65
   signatures and two verifications. Targets: bootstrap <= 3x its primitives, PSK <= 1 ms.
2. Key agreement, sans-IO: a master and a slave ``LinkAgreement`` over real SQLite
   ``KeyStore``s, both pre-filled with the same QKD keys (the QKD source is never the
   bottleneck), their messages carried through an established pair of ``PeerConnection``s
   (encode, seal, open, decode), until the QKD keys run out; batches of 1024 and 4096
   keys, the median of the runs. Both sides run in this one thread, so the cost per key is
   both sides' work. Floors per key and side, measured here: the batch's keystream (one
   SHAKE-256 call of 32 bytes x batch), sealing at rest (one AES-256-GCM seal of an 8 KiB
   chunk / 256 keys) and durability (one synchronous=FULL SQLite commit of a 128 KiB blob
   / 4096 keys). ``--profile`` (and ``--quick``) adds cProfile's top functions of one run.
3. Key agreement between two real ``qkdd`` daemons over TCP on loopback
   (``peer_daemons``): their stores pre-filled with the same QKD keys before they start,
   their devices absent; keys made ready at the link master per second, from the first
   batch until the QKD keys are used up (and, beside it, from the first ready key), and
   each daemon's CPU seconds per 100k keys. Floors: part 2's sans-IO rate and CPU time
   per key for the daemons' batch size, in this run. ``--profile`` also runs both
   daemons once under cProfile (CPU time).

Targets (both parts): at least 100k 256-bit keys/s (25.6 Mbit/s); the aim is 430k keys/s
(110 Mbit/s). Figures depend on the machine's load, printed beside them (/proc/loadavg).

    python bench/bench_peer.py [--runs N] [--agreement-runs R] [--qkd-keys N]
                               [--daemon-keys N] [--profile] [--quick]
    OQS_INSTALL_PATH=/opt/liboqs python bench/bench_peer.py   # include liboqs
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import hmac
import os
import pstats
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import trio
from backends import available_backends
from peer_daemons import (
    daemon_table,
    load_average,
    md_header,
    md_row,
    prefill_qkd_keys,
    print_top_functions,
    verdict,
)

import qkdd.crypto
from qkdd.crypto import AT_REST_AEAD_ALGORITHM, Aead, PqcBackend, X25519KeyPair
from qkdd.keystore import KeyStore
from qkdd.link_params import LinkParameters
from qkdd.peer.agreement import LinkAgreement
from qkdd.peer.agreement_messages import LinkMessage, decode_message
from qkdd.peer.connection import AuthKey, MessageReceived, PeerConnection, Role
from qkdd.peering import complete_handshake
from qkdd.store.key_blocks import CHUNK_MATERIAL_BYTES

KEY_BITS = 256
KEY_BYTES = KEY_BITS // 8
PSK_TARGET_MS = 1.0
BOOTSTRAP_TARGET_RATIO = 3.0
BATCH_SIZES = (1024, 4096)
# The durability floor: one commit of this much key material, spread over its keys.
COMMIT_FLOOR_KEYS = 4096
MASTER, SLAVE = "site-a", "site-b"


# -- timing helpers ---------------------------------------------------------------------------


def median_seconds(operation: Callable[[], object], samples: int = 51) -> float:
    """Median seconds per call, each sample a batch calibrated to >= 200 µs."""
    operation()
    batch = 1
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            operation()
        if time.perf_counter() - start >= 200e-6:
            break
        batch *= 2
    timings = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(batch):
            operation()
        timings.append((time.perf_counter() - start) / batch)
    return statistics.median(timings)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- part 1: handshakes ------------------------------------------------------------------------


class Trust:
    def __init__(self, pins: dict[str, bytes], psk: AuthKey | None) -> None:
        self._pins = pins
        self._psk = psk

    def pinned_key(self, site_id: str) -> bytes | None:
        return self._pins.get(site_id)

    def bootstrap_allowed(self, site_id: str) -> bool:
        return True

    def auth_key(self, site_id: str, key_id: str) -> bytes | None:
        return self._psk.material if self._psk and self._psk.key_id == key_id else None


class HandshakeSetup:
    """Identities and a PSK, and fresh connection pairs from them."""

    def __init__(self, backend: PqcBackend) -> None:
        self.backend = backend
        self.keys = {
            site: backend.signing_key_from_seed(os.urandom(32)) for site in (MASTER, SLAVE)
        }
        self.pins = {site: key.public_bytes for site, key in self.keys.items()}
        self.psk = AuthKey(str(uuid.uuid4()), os.urandom(32))

    def pair(self, mode: int) -> tuple[PeerConnection, PeerConnection]:
        psk = self.psk if mode == 2 else None
        initiator = PeerConnection(
            Role.INITIATOR,
            backend=self.backend,
            local_site_id=MASTER,
            signing_key=self.keys[MASTER],
            trust=Trust(self.pins, psk),
            expected_peer=SLAVE,
            auth_key=psk,
        )
        responder = PeerConnection(
            Role.RESPONDER,
            backend=self.backend,
            local_site_id=SLAVE,
            signing_key=self.keys[SLAVE],
            trust=Trust(self.pins, psk),
        )
        return initiator, responder


def handshake_in_memory(initiator: PeerConnection, responder: PeerConnection) -> None:
    initiator.initiate()
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send())
    assert initiator.session_id is not None and initiator.session_id == responder.session_id


def sans_io_latencies(setup: HandshakeSetup, mode: int, runs: int) -> list[float]:
    out = []
    for _ in range(runs + 1):
        initiator, responder = setup.pair(mode)  # construction is not part of a handshake
        start = time.perf_counter()
        handshake_in_memory(initiator, responder)
        out.append(time.perf_counter() - start)
    return out[1:]  # the first run warms caches up


async def tcp_latencies(setup: HandshakeSetup, mode: int, runs: int) -> list[float]:
    """Handshakes over fresh loopback TCP connections, pumped by the daemon's own code."""
    out: list[float] = []
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with listener:
        for _ in range(runs + 1):
            initiator, responder = setup.pair(mode)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            server = await listener.accept()
            async with client, server, trio.open_nursery() as nursery:
                start = time.perf_counter()
                nursery.start_soon(complete_handshake, server, responder)
                initiator.initiate()
                await client.send_all(initiator.data_to_send())
                await complete_handshake(client, initiator)
            # The nursery has waited for the responder to verify FINISH.
            out.append(time.perf_counter() - start)
    return out[1:]


def count_hmacs(setup: HandshakeSetup, mode: int) -> int:
    """HMAC-SHA256 computations in one handshake, both sides."""
    calls = 0
    real = hmac.digest

    def counting(key: bytes, msg: bytes, digest: str) -> bytes:
        nonlocal calls
        calls += 1
        return real(key, msg, digest)

    initiator, responder = setup.pair(mode)
    with mock.patch.object(qkdd.crypto.hmac, "digest", counting):
        handshake_in_memory(initiator, responder)
    return calls


def primitive_costs(backend: PqcBackend) -> dict[str, float]:
    receiver = backend.kem_generate()
    _, ciphertext = backend.kem_encapsulate(receiver.public_bytes)
    signer = backend.signing_key_from_seed(os.urandom(32))
    digest, context = os.urandom(32), b"qkdd/bench"
    signature = signer.sign(digest, context)
    peer = X25519KeyPair()
    key = os.urandom(32)
    return {
        "kem_keygen": median_seconds(backend.kem_generate),
        "kem_encaps": median_seconds(lambda: backend.kem_encapsulate(receiver.public_bytes)),
        "kem_decaps": median_seconds(lambda: receiver.decapsulate(ciphertext)),
        "x25519": median_seconds(lambda: X25519KeyPair().exchange(peer.public_bytes)),
        "sign": median_seconds(lambda: signer.sign(digest, context)),
        "verify": median_seconds(
            lambda: backend.verify(signer.public_bytes, digest, signature, context)
        ),
        "hmac": median_seconds(lambda: hmac.digest(key, digest, "sha256")),
    }


def handshake_table(backends: dict[str, PqcBackend], runs: int) -> None:
    print(f"\n1. Handshake latency, {runs} runs each (ms)")
    header = (
        f"{'backend':13}{'mode':11}{'transport':10}{'p50':>8}{'p99':>8}"
        f"{'primitives':>12}{'p50/prim':>10}  target"
    )
    print(header)
    print("-" * (len(header) + 14))
    for name, backend in backends.items():
        setup = HandshakeSetup(backend)
        cost = primitive_costs(backend)
        for mode, label in ((1, "bootstrap"), (2, "psk")):
            hmacs = count_hmacs(setup, mode)
            prim = (
                cost["kem_keygen"]
                + cost["kem_encaps"]
                + cost["kem_decaps"]
                + 2 * cost["x25519"]
                + hmacs * cost["hmac"]
            )
            if mode == 1:
                prim += 2 * cost["sign"] + 2 * cost["verify"]
            mode_runs = runs if mode == 2 else max(20, runs // 4)
            for transport in ("sans-io", "tcp"):
                if transport == "sans-io":
                    latencies = sans_io_latencies(setup, mode, mode_runs)
                else:
                    latencies = trio.run(tcp_latencies, setup, mode, mode_runs)
                p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
                if mode == 1:
                    ok = p50 / prim <= BOOTSTRAP_TARGET_RATIO
                    target = f"<= {BOOTSTRAP_TARGET_RATIO:.0f}x prim: {'met' if ok else 'MISSED'}"
                else:
                    ok = p50 * 1e3 <= PSK_TARGET_MS
                    target = f"<= {PSK_TARGET_MS:.0f} ms: {'met' if ok else 'MISSED'}"
                print(
                    f"{name:13}{label:11}{transport:10}{p50 * 1e3:>8.3f}{p99 * 1e3:>8.3f}"
                    f"{prim * 1e3:>12.3f}{p50 / prim:>10.2f}  {target}"
                )
        print(
            f"{'':13}primitives (µs): "
            + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in cost.items())
            + f"; HMACs per handshake: mode 1 {count_hmacs(setup, 1)}, "
            f"mode 2 {count_hmacs(setup, 2)}"
        )


# -- part 2: key agreement, sans-IO ----------------------------------------------------------


def make_templates(directory: Path, kek: bytes, qkd_keys: int) -> tuple[Path, Path]:
    """Master and slave stores holding the same QKD keys, closed: each run starts from a
    copy (filling a store costs more than agreeing its keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "master.db", directory / "slave.db"
    prefill_qkd_keys([(paths[0], kek, SLAVE), (paths[1], kek, MASTER)], qkd_keys)
    return paths


def carry(
    messages: list[LinkMessage], sender: PeerConnection, receiver: PeerConnection
) -> list[LinkMessage]:
    """Seal, send and open the messages, as a session does."""
    if not messages:
        return []
    for message in messages:
        sender.send_message(message.encode())
    events = receiver.receive_data(sender.data_to_send())
    return [decode_message(e.payload) for e in events if isinstance(e, MessageReceived)]


def pump(
    master: LinkAgreement, slave: LinkAgreement, m_conn: PeerConnection, s_conn: PeerConnection
) -> None:
    """Both sides' messages, both ways, until nothing moves (the QKD keys ran out). Each
    side is polled, as a daemon wakes it, only when nothing is on the wire (nothing else
    changes its store here). The clock stands still: every reply comes at once, so no
    deadline matters."""
    now = 0.0
    to_slave, to_master = master.start(now), slave.start(now)
    while True:
        if not to_slave and not to_master:
            to_slave, to_master = master.poll(now), slave.poll(now)
            if not to_slave and not to_master:
                return
        arrived, to_slave = carry(to_slave, m_conn, s_conn), []
        for message in arrived:
            to_master += slave.on_message(message, now)
        arrived, to_master = carry(to_master, s_conn, m_conn), []
        for message in arrived:
            to_slave += master.on_message(message, now)


@dataclass(frozen=True)
class AgreementRun:
    keys: int
    seconds: float
    cpu_seconds: float  # this process's, both sides together

    @property
    def rate(self) -> float:
        return self.keys / self.seconds


def agreement_run(
    templates: tuple[Path, Path],
    directory: Path,
    kek: bytes,
    backend: PqcBackend,
    batch_keys: int,
    pool_size: int,
    profiler: cProfile.Profile | None = None,
) -> AgreementRun:
    """One run from fresh copies of the template stores: the keys made ready at the master
    (as its store counts them) and the seconds the agreement took."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    with ExitStack() as stack:
        stores = []
        for template in templates:
            shutil.copyfile(template, directory / template.name)
            store = KeyStore(directory / template.name, kek)
            stack.callback(store.close)
            stores.append(store)
        initiator, responder = HandshakeSetup(backend).pair(2)
        handshake_in_memory(initiator, responder)
        assert initiator.session_id is not None
        agreements = []
        for store, local, peer in ((stores[0], MASTER, SLAVE), (stores[1], SLAVE, MASTER)):
            params = LinkParameters(
                local,
                peer,
                frozenset({f"sae-{local}"}),
                frozenset({f"sae-{peer}"}),
                KEY_BITS,
                pool_size=pool_size,  # the pools never fill: the QKD keys run out first
                qkd_buffer_keys=pool_size,
            )
            agreements.append(
                LinkAgreement(
                    params,
                    store=store,
                    backend=backend,
                    session_id=initiator.session_id,
                    batch_keys=batch_keys,
                )
            )
        if profiler is not None:
            profiler.enable()
        start, cpu_start = time.perf_counter(), time.process_time()
        pump(agreements[0], agreements[1], initiator, responder)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        if profiler is not None:
            profiler.disable()
        made = stores[0].hybrid_keys_made(SLAVE), stores[1].hybrid_keys_made(MASTER)
        if made[0] != made[1]:
            raise RuntimeError(f"the sites made different numbers of keys: {made}")
    return AgreementRun(made[0], seconds, cpu_seconds)


def floors(directory: Path, batch_keys: int) -> dict[str, float]:
    """Seconds per key and side of the work no agreement avoids, each measured alone."""
    prefix = os.urandom(200)  # a keystream input: label, PRK and binding
    gcm = Aead(os.urandom(32), AT_REST_AEAD_ALGORITHM)
    nonce, chunk, aad = os.urandom(12), os.urandom(CHUNK_MATERIAL_BYTES), os.urandom(64)
    blob = os.urandom(COMMIT_FLOOR_KEYS * KEY_BYTES)
    db = sqlite3.connect(directory / f"floor-{batch_keys}.db", isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON"):
        db.execute(f"PRAGMA {pragma}")
    db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, material BLOB NOT NULL)")

    def commit_blob() -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t (material) VALUES (?)", (blob,))
        db.execute("COMMIT")

    try:
        return {
            f"SHAKE-256 keystream, {batch_keys} x 32 B in one call": median_seconds(
                lambda: hashlib.shake_256(prefix).digest(batch_keys * KEY_BYTES)
            )
            / batch_keys,
            "AES-256-GCM seal of an 8 KiB chunk / 256": median_seconds(
                lambda: gcm.seal(nonce, chunk, aad)
            )
            / (CHUNK_MATERIAL_BYTES // KEY_BYTES),
            "SQLite durable commit of 128 KiB / 4096": median_seconds(commit_blob, samples=21)
            / COMMIT_FLOOR_KEYS,
        }
    finally:
        db.close()


def agreement_table(
    backends: dict[str, PqcBackend],
    directory: Path,
    qkd_keys: int,
    runs: int,
    profile: bool,
) -> dict[tuple[str, int], AgreementRun]:
    """Part 2; returns the median run per (backend, batch size)."""
    print(f"\n2. Key agreement, sans-IO: {qkd_keys:,} QKD keys of {KEY_BITS} bits, two stores")
    kek = os.urandom(32)
    templates = make_templates(directory / "templates", kek, qkd_keys)
    floor = {size: floors(directory, size) for size in BATCH_SIZES}
    print(f"\nFloors, µs per key and side ({load_average()}):\n")
    print(md_header("floor", *(f"batch {size}" for size in BATCH_SIZES)))
    for place in range(3):
        name = list(floor[BATCH_SIZES[-1]])[place].replace(f"{BATCH_SIZES[-1]} x", "batch x")
        cells = [f"{list(floor[size].values())[place] * 1e6:.3f}" for size in BATCH_SIZES]
        print(md_row(name, *cells))
    sums = {size: sum(floor[size].values()) for size in BATCH_SIZES}
    print(md_row("sum (one side)", *(f"{sums[size] * 1e6:.3f}" for size in BATCH_SIZES)))

    medians: dict[tuple[str, int], AgreementRun] = {}
    print(
        f"\nAgreement rate, median of {runs} run(s) ({load_average()}); µs/key is both "
        "sides' work (one thread), the floor is twice one side's; CPU is this process's:\n"
    )
    print(
        md_header(
            "part", "backend", "batch", "runs", "keys agreed", "seconds", "keys/s", "Mbit/s",
            "µs/key", "CPU µs/key", "floor µs/key", "x floor", "CPU x floor",
            "target 100k keys/s",
        )
    )  # fmt: skip
    for name, backend in backends.items():
        for size in BATCH_SIZES:
            results = [
                agreement_run(templates, directory / "run", kek, backend, size, qkd_keys)
                for _ in range(runs)
            ]
            median = sorted(results, key=lambda r: r.rate)[len(results) // 2]
            medians[(name, size)] = median
            both_sides = 2 * sums[size]
            per_key = median.seconds / max(1, median.keys)
            cpu_per_key = median.cpu_seconds / max(1, median.keys)
            print(
                md_row(
                    "sans-IO",
                    name,
                    size,
                    runs,
                    f"{median.keys:,}",
                    f"{median.seconds:.3f}",
                    f"{median.rate:,.0f}",
                    f"{median.rate * KEY_BITS / 1e6:.1f}",
                    f"{per_key * 1e6:.2f}",
                    f"{cpu_per_key * 1e6:.2f}",
                    f"{both_sides * 1e6:.3f}",
                    f"{per_key / both_sides:.1f}",
                    f"{cpu_per_key / both_sides:.1f}",
                    verdict(median.rate),
                )
            )
    if profile:
        name, backend = next(iter(backends.items()))
        size = BATCH_SIZES[-1]
        # CPU time, not wall time: other work on the machine does not blur where it goes.
        profiler = cProfile.Profile(time.process_time)
        run = agreement_run(templates, directory / "run", kek, backend, size, qkd_keys, profiler)
        print(
            f"\ncProfile (CPU time) of one sans-IO run, both sides ({name}, batch {size}, "
            f"{run.keys:,} keys):\n"
        )
        print_top_functions(pstats.Stats(profiler), 15)
    return medians


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="PSK handshakes per row")
    parser.add_argument("--agreement-runs", type=int, default=3, help="runs per rate row")
    parser.add_argument("--qkd-keys", type=int, default=200_000, help="QKD keys, part 2")
    parser.add_argument("--daemon-keys", type=int, default=200_000, help="QKD keys, part 3")
    parser.add_argument("--profile", action="store_true", help="cProfile one run of each part")
    parser.add_argument(
        "--quick", action="store_true", help="few runs and keys, same tables (a smoke test)"
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.agreement_runs = 20, 1
        args.qkd_keys = args.daemon_keys = 20_000
    backends = available_backends()
    handshake_table(backends, args.runs)
    with tempfile.TemporaryDirectory(prefix="qkdd-bench-") as tmp:
        directory = Path(tmp)
        medians = agreement_table(
            backends,
            directory / "sans-io",
            args.qkd_keys,
            args.agreement_runs,
            args.profile or args.quick,
        )
        daemon_table(
            backends,
            directory / "daemons",
            args.daemon_keys,
            args.agreement_runs,
            {key: (run.rate, run.cpu_seconds / max(1, run.keys)) for key, run in medians.items()},
            profile=args.profile,
        )


if __name__ == "__main__":
    main()
