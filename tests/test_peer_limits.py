"""Pre-authentication limits: unauthenticated clients cannot hold more than their share of
handshake slots, cannot hold one for long without a HELLO, and cannot keep a configured
peer out."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from timeouts import timeout, wait_until

from qkdd.config import load_config
from qkdd.demo import prepare_directory
from qkdd.peer.admission import (
    MAX_PENDING_HANDSHAKES_PER_ADDRESS,
    HandshakeLimiter,
    HandshakeSlot,
)
from qkdd.peer.wire import FRAME_HEADER, PROTOCOL_VERSION, FrameType

STRANGER = "127.0.0.2"  # loopback, but not a configured peer's address


class Evictions:
    """Which admitted connections were told to go."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def of(self, name: str):
        return lambda: self.names.append(name)


def admit_all(limiter: HandshakeLimiter, *addresses: str) -> list[HandshakeSlot | None]:
    return [limiter.admit(address, evict=lambda: None) for address in addresses]


def test_the_per_address_cap_refuses_at_once() -> None:
    limiter = HandshakeLimiter(total=10, per_address=2)
    assert all(admit_all(limiter, "192.0.2.1", "192.0.2.1"))
    assert limiter.admit("192.0.2.1", evict=lambda: None) is None
    assert limiter.admit("192.0.2.2", evict=lambda: None) is not None


def test_the_total_cap_refuses_when_no_stranger_waits_for_hello() -> None:
    limiter = HandshakeLimiter(total=3, per_address=2)
    slots = admit_all(limiter, "192.0.2.1", "192.0.2.1", "192.0.2.2")
    for slot in slots:
        assert slot is not None
        limiter.hello_accepted(slot)  # each has sent an acceptable HELLO: none is evicted
    assert limiter.admit("192.0.2.3", evict=lambda: None) is None
    assert slots[0] is not None
    limiter.release(slots[0])
    assert limiter.admit("192.0.2.3", evict=lambda: None) is not None


def test_a_newcomer_evicts_the_busiest_sources_oldest_waiting_connection() -> None:
    limiter = HandshakeLimiter(total=3, per_address=2)
    evictions = Evictions()
    a1 = limiter.admit("192.0.2.1", evict=evictions.of("a1"))
    a2 = limiter.admit("192.0.2.1", evict=evictions.of("a2"))
    b1 = limiter.admit("192.0.2.2", evict=evictions.of("b1"))
    assert a1 and a2 and b1
    newcomer = limiter.admit("192.0.2.3", evict=evictions.of("c1"))
    assert newcomer is not None and evictions.names == ["a1"] and a1.evicted
    limiter.release(a1)  # the evicted connection's own release changes nothing
    assert limiter.in_progress == 3
    # Every source now holds one slot: a source that holds one gains nothing by evicting.
    assert limiter.admit("192.0.2.2", evict=evictions.of("b2")) is None
    # A source holding none still gets in, in place of the oldest waiting connection.
    assert limiter.admit("192.0.2.4", evict=evictions.of("d1")) is not None
    assert evictions.names == ["a1", "a2"]


def test_a_connection_whose_hello_was_accepted_is_never_evicted() -> None:
    limiter = HandshakeLimiter(total=2, per_address=2)
    evictions = Evictions()
    first = limiter.admit("192.0.2.1", evict=evictions.of("first"))
    second = limiter.admit("192.0.2.1", evict=evictions.of("second"))
    assert first and second
    limiter.hello_accepted(first)
    assert limiter.admit("192.0.2.9", evict=lambda: None) is not None
    assert evictions.names == ["second"]


def test_configured_peer_addresses_have_slots_strangers_cannot_take() -> None:
    limiter = HandshakeLimiter(total=2, per_address=2, reserved=2, peer_addresses=["192.0.2.7"])
    for slot in admit_all(limiter, "192.0.2.1", "192.0.2.1"):
        assert slot is not None
        limiter.hello_accepted(slot)
    assert limiter.admit("192.0.2.2", evict=lambda: None) is None  # strangers are full
    peer = admit_all(limiter, "192.0.2.7", "192.0.2.7")
    assert all(slot is not None and slot.reserved for slot in peer)
    assert limiter.admit("192.0.2.7", evict=lambda: None) is None  # beyond its reservation
    first = peer[0]
    assert first is not None
    limiter.release(first)
    limiter.release(first)
    assert limiter.admit("192.0.2.7", evict=lambda: None) is not None


def test_addresses_are_normalised_and_ipv6_counts_per_64() -> None:
    limiter = HandshakeLimiter(total=10, per_address=2, peer_addresses=["127.0.0.1"])
    mapped = limiter.admit("::ffff:127.0.0.1", evict=lambda: None)
    assert mapped is not None and mapped.reserved and mapped.address == "127.0.0.1"
    assert all(admit_all(limiter, "2001:db8:0:1::1", "2001:db8:0:1::2"))
    assert limiter.admit("2001:db8:0:1:ffff::3", evict=lambda: None) is None  # same /64
    assert limiter.admit("2001:db8:0:2::1", evict=lambda: None) is not None


def test_idle_and_trickling_connections_are_closed(tmp_path):
    """Connections over the per-address cap are closed at once; those that never finish
    a HELLO (silent, or trickling one byte at a time) are closed by the HELLO timeout."""
    configs = prepare_directory(tmp_path)
    config = load_config(configs["site-b"])
    log = tmp_path / "b.log"
    with open(log, "wb") as handle:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qkdd", "run", "--config", str(configs["site-b"])],
            stdout=subprocess.DEVNULL,
            stderr=handle,
        )
    clients = []
    try:
        wait_until(
            lambda: "event=peer_listener_ready" in log.read_text(),
            "the peer listener",
            20,
            log.read_text,
        )
        for _ in range(MAX_PENDING_HANDSHAKES_PER_ADDRESS + 2):
            # From a stranger's address (site-b keeps slots for site-a's, 127.0.0.1).
            clients.append(
                socket.create_connection(
                    config.listen, timeout=timeout(5), source_address=(STRANGER, 0)
                )
            )
        time.sleep(0.5)
        closed = []
        for client in clients:
            client.setblocking(False)
            try:
                closed.append(client.recv(1) == b"")
            except BlockingIOError:
                closed.append(False)  # still open, waiting for our HELLO
        assert closed.count(False) == MAX_PENDING_HANDSHAKES_PER_ADDRESS
        assert closed.count(True) == 2
        assert "event=handshake_refused" in log.read_text()

        # One open connection trickles a HELLO header and then a byte at a time.
        open_clients = [c for c, gone in zip(clients, closed, strict=True) if not gone]
        trickler = open_clients[0]
        trickler.sendall(FRAME_HEADER.pack(PROTOCOL_VERSION, FrameType.HELLO, 1300))
        deadline = time.monotonic() + timeout(30)
        remaining = set(open_clients)
        while remaining:
            if time.monotonic() >= deadline:  # only a hang gets here
                raise AssertionError("idle connections were never closed")
            for client in list(remaining):
                try:
                    if client.recv(1) == b"":
                        remaining.discard(client)
                        continue
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    remaining.discard(client)
                    continue
                if client is trickler:
                    try:
                        trickler.send(b"\x00")
                    except OSError:
                        remaining.discard(client)
            time.sleep(0.1)
        assert log.read_text().count("no HELLO within") == MAX_PENDING_HANDSHAKES_PER_ADDRESS
        assert daemon.poll() is None
    finally:
        for client in clients:
            client.close()
        daemon.terminate()
        daemon.wait(timeout=timeout(20))
