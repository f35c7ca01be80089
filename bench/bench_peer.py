"""Peer protocol cost: handshake latency beside its bare primitives, and the end-to-end
key-agreement rate between two ``LinkAgreement``s beside per-key floors, all measured in
the same run.

1. Handshakes, bootstrap (mode 1, ML-DSA-65) and PSK (mode 2): two ``PeerConnection``s in
   memory (sans-IO) and over a real TCP connection on loopback with Trio
   (``qkdd.peering.complete_handshake``), p50 and p99 over N runs, for each available PQC
   backend. The primitives column is the sum of the medians of what a handshake must
   compute: ML-KEM-768 keygen + encapsulate + decapsulate, two X25519 shares and
   exchanges, every HMAC-SHA256 (counted in a real handshake), and in mode 1 two ML-DSA-65
   signatures and two verifications. Targets: bootstrap <= 3x its primitives, PSK <= 1 ms.
2. Key agreement: a master and a slave ``LinkAgreement`` with real SQLite ``KeyStore``s,
   both pre-filled with the same QKD keys (an unpaced source), exchanging their messages
   through an established pair of ``PeerConnection``s (encode, seal, open, decode), until
   the QKD keys run out. Floors: the per-key work both sides cannot avoid (a hybrid
   derivation, sealing the key at rest, opening the QKD key, three row writes), each
   measured alone. Target: 430k 256-bit keys/s (110 Mbit/s). cProfile names where the
   time goes.

    python bench/bench_peer.py [--runs N] [--qkd-keys N] [--profile-keys N] [--quick]
    OQS_INSTALL_PATH=/opt/liboqs python bench/bench_peer.py   # include liboqs
"""

from __future__ import annotations

import argparse
import cProfile
import hmac
import os
import pstats
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import trio
from backends import available_backends

import qkdd.crypto
from qkdd.crypto import (
    AT_REST_AEAD_ALGORITHM,
    Aead,
    PqcBackend,
    X25519KeyPair,
    hkdf,
)
from qkdd.crypto.select import select_backend
from qkdd.hybrid import HybridDeriver, KemExchange, KeyContext
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link import LinkAgreement, LinkParameters
from qkdd.peer.connection import AuthKey, MessageReceived, PeerConnection, Role
from qkdd.peer.messages import LinkMessage, decode_message
from qkdd.peering import complete_handshake

KEY_BITS = 256
PSK_TARGET_MS = 1.0
BOOTSTRAP_TARGET_RATIO = 3.0
RATE_TARGET_KEYS = 430_000
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


# -- part 2: key agreement ---------------------------------------------------------------------


@contextmanager
def agreement_pair(
    directory: Path, backend: PqcBackend, qkd_keys: int
) -> Iterator[
    tuple[LinkAgreement, LinkAgreement, PeerConnection, PeerConnection, KeyStore, KeyStore]
]:
    kek = os.urandom(32)
    stores = KeyStore(directory / "master.db", kek), KeyStore(directory / "slave.db", kek)
    try:
        chunk = 20_000
        for start in range(0, qkd_keys, chunk):
            keys = [
                StoredQkdKey(str(uuid.uuid4()), os.urandom(KEY_BITS // 8))
                for _ in range(min(chunk, qkd_keys - start))
            ]
            stores[0].store_qkd_keys(SLAVE, keys)
            stores[1].store_qkd_keys(MASTER, keys)
        setup = HandshakeSetup(backend)
        initiator, responder = setup.pair(2)
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
                pool_size=10 * qkd_keys,  # never full: the master always has a deficit
            )
            agreements.append(
                LinkAgreement(params, store=store, backend=backend, session_id=initiator.session_id)
            )
        yield agreements[0], agreements[1], initiator, responder, stores[0], stores[1]
    finally:
        for store in stores:
            store.close()


def carry(
    messages: list[LinkMessage], sender: PeerConnection, receiver: PeerConnection
) -> list[LinkMessage]:
    """Seal, send and open the messages, as a session does."""
    for message in messages:
        sender.send_message(message.encode())
    events = receiver.receive_data(sender.data_to_send()) if messages else []
    return [decode_message(e.payload) for e in events if isinstance(e, MessageReceived)]


def run_agreement(
    master: LinkAgreement,
    slave: LinkAgreement,
    m_conn: PeerConnection,
    s_conn: PeerConnection,
    master_store: KeyStore,
) -> int:
    """Run batches until the QKD keys run out; return the application keys agreed (made
    ready at the master, as its store counts them)."""
    made_before = master_store.hybrid_keys_made(SLAVE)
    now = 0.0
    for message in carry(master.start(), m_conn, s_conn):
        slave.on_message(message, now)
    for message in carry(slave.start(), s_conn, m_conn):
        master.on_message(message, now)
    while True:
        batch = master.poll(now)
        if not batch:
            return master_store.hybrid_keys_made(SLAVE) - made_before
        replies: list[LinkMessage] = []
        for message in carry(batch, m_conn, s_conn):
            replies += slave.on_message(message, now)
        decisions: list[LinkMessage] = []
        for message in carry(replies, s_conn, m_conn):
            decisions += master.on_message(message, now)
        for message in carry(decisions, m_conn, s_conn):
            slave.on_message(message, now)


def floors(backend: PqcBackend, directory: Path) -> dict[str, float]:
    """Seconds per unit of the per-key work, each measured alone."""
    receiver = backend.kem_generate()
    shared, ciphertext = backend.kem_encapsulate(receiver.public_bytes)
    deriver = HybridDeriver(
        KeyContext(os.urandom(32), MASTER, SLAVE),
        KemExchange(receiver.public_bytes, ciphertext, shared),
    )
    qkd_id, key_id, material = str(uuid.uuid4()), str(uuid.uuid4()), os.urandom(32)
    salt, ikm, info = os.urandom(32), os.urandom(80), os.urandom(200)
    gcm = Aead(os.urandom(32), AT_REST_AEAD_ALGORITHM)
    nonce = os.urandom(12)
    sealed = gcm.seal(nonce, material, b"row identity")

    db = sqlite3.connect(directory / "floor.db", isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON"):
        db.execute(f"PRAGMA {pragma}")
    db.execute("CREATE TABLE t (key_id TEXT PRIMARY KEY, material BLOB NOT NULL)")
    rows_per_tx = 256

    def insert_batch() -> None:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO t VALUES (?, ?)",
            [(str(uuid.uuid4()), sealed) for _ in range(rows_per_tx)],
        )
        db.execute("COMMIT")

    result = {
        "HKDF-SHA256 (raw)": median_seconds(lambda: hkdf(salt, ikm, info, 32)),
        "hybrid derivation": median_seconds(
            lambda: deriver.derive(
                key_id=key_id,
                master_sae_id="sae-a",
                slave_sae_id="sae-b",
                qkd_key_ids=(qkd_id,),
                qkd_material=material,
                size_bits=KEY_BITS,
                label=b"qkdd/bench",
            )
        ),
        "AES-256-GCM seal 32 B": median_seconds(lambda: gcm.seal(nonce, material, b"row identity")),
        "AES-256-GCM open 32 B": median_seconds(lambda: gcm.open(nonce, sealed, b"row identity")),
        "SQLite insert (256/tx, FULL)": median_seconds(insert_batch, samples=21) / rows_per_tx,
    }
    db.close()
    return result


def agreement_table(backend: PqcBackend, qkd_keys: int, profile_keys: int) -> None:
    print(f"\n2. Key agreement, two LinkAgreements, {qkd_keys} QKD keys of {KEY_BITS} bits")
    with tempfile.TemporaryDirectory(prefix="qkdd-bench-") as tmp:
        directory = Path(tmp)
        floor = floors(backend, directory)
        with agreement_pair(directory / "run", backend, qkd_keys) as (m, s, mc, sc, ms, _):
            start = time.perf_counter()
            agreed = run_agreement(m, s, mc, sc, ms)
            elapsed = time.perf_counter() - start
        # Per key, each side derives, seals the key, opens the QKD key, and writes three rows
        # (the key, the consumed QKD ID, the deletion of the QKD key).
        per_key = 2 * (
            floor["hybrid derivation"]
            + floor["AES-256-GCM seal 32 B"]
            + floor["AES-256-GCM open 32 B"]
            + 3 * floor["SQLite insert (256/tx, FULL)"]
        )
        rate = agreed / elapsed
        print(f"{'what':38}{'per second':>14}{'µs each':>10}")
        print("-" * 62)
        for name, seconds in floor.items():
            print(f"{name:38}{1 / seconds:>14,.0f}{seconds * 1e6:>10.2f}")
        print(
            f"{'floor: per-key work of both sides':38}{1 / per_key:>14,.0f}{per_key * 1e6:>10.2f}"
        )
        print(f"{'measured: keys agreed':38}{rate:>14,.0f}{1e6 / rate:>10.2f}")
        print(
            f"\n{agreed} keys in {elapsed:.2f} s = {rate:,.0f} keys/s = "
            f"{rate * KEY_BITS / 1e6:.1f} Mbit/s = {rate * per_key:.2f} of the floor rate; "
            f"target {RATE_TARGET_KEYS:,} keys/s "
            f"({RATE_TARGET_KEYS * KEY_BITS / 1e6:.0f} Mbit/s): "
            f"{'met' if rate >= RATE_TARGET_KEYS else f'MISSED by {RATE_TARGET_KEYS / rate:.0f}x'}"
        )

        print(f"\ncProfile of {profile_keys} keys, top functions by own time:")
        with agreement_pair(directory / "profile", backend, profile_keys) as pair:
            m, s, mc, sc, ms, _ = pair
            profiler = cProfile.Profile()
            profiler.enable()
            run_agreement(m, s, mc, sc, ms)
            profiler.disable()
        stats = pstats.Stats(profiler)
        rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
        total = sum(row[1][2] for row in rows)
        print(f"{'own s':>8}{'share':>7}{'calls':>10}  function")
        for (path, line, function), (_, calls, own, _cum, _) in rows[:15]:
            where = f"{Path(path).name}:{line}" if line else path
            print(f"{own:>8.3f}{own / total:>7.1%}{calls:>10}  {function} ({where})")
        # Where the time goes, by kind of work (own time of the C-level calls).
        kinds = {
            "SQLite": ("sqlite3.", "execute", "fetch", "commit"),
            "AEAD (seal/open)": ("AESGCM", "ChaCha20Poly1305"),
            "HMAC/HKDF": ("hmac.", "_hashlib"),
            "uuid": ("uuid",),
        }
        for kind, needles in kinds.items():
            own = sum(
                row[1][2] for row in rows if any(n in f"{row[0][0]}{row[0][2]}" for n in needles)
            )
            print(f"{kind:24}{own / total:>6.0%} of own time")
        sql_table(backend, directory / "sql", profile_keys)


class TimedConnection:
    """Wraps a store's sqlite3 connection to total the time spent per SQL statement."""

    def __init__(self, db: sqlite3.Connection, totals: dict[str, list[float]]) -> None:
        self._db = db
        self._totals = totals

    def _timed(self, method: str, sql: str, *args: object) -> object:
        start = time.perf_counter()
        result = getattr(self._db, method)(sql, *args)
        entry = self._totals.setdefault(" ".join(sql.split())[:72], [0.0, 0])
        entry[0] += time.perf_counter() - start
        entry[1] += 1
        return result

    def execute(self, sql: str, *args: object) -> object:
        return self._timed("execute", sql, *args)

    def executemany(self, sql: str, *args: object) -> object:
        return self._timed("executemany", sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def sql_table(backend: PqcBackend, directory: Path, qkd_keys: int) -> None:
    totals: dict[str, list[float]] = {}
    with agreement_pair(directory, backend, qkd_keys) as (m, s, mc, sc, ms, ss):
        for store in (ms, ss):
            store._db = TimedConnection(store._db, totals)  # type: ignore[assignment]
        start = time.perf_counter()
        agreed = run_agreement(m, s, mc, sc, ms)
        elapsed = time.perf_counter() - start
    print(f"\nSQL statements, both stores, {agreed} keys in {elapsed:.2f} s (top 8 by time):")
    print(f"{'total s':>8}{'share':>7}{'calls':>9}{'µs/key':>8}  statement")
    for sql, (spent, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"{spent:>8.2f}{spent / elapsed:>7.0%}{calls:>9}{spent / agreed * 1e6:>8.1f}  {sql}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="PSK handshakes per row")
    parser.add_argument("--qkd-keys", type=int, default=200_000, help="QKD keys pre-filled")
    parser.add_argument("--profile-keys", type=int, default=20_000, help="QKD keys profiled")
    parser.add_argument(
        "--quick", action="store_true", help="few runs and keys, same tables (a smoke test)"
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.qkd_keys, args.profile_keys = 20, 2000, 500
    handshake_table(available_backends(), args.runs)
    agreement_table(select_backend("auto"), args.qkd_keys, args.profile_keys)


if __name__ == "__main__":
    main()
