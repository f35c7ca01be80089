"""Pre-authentication limits: unauthenticated clients cannot hold more than their share of
handshake slots."""

from __future__ import annotations

import socket
import time

from qkdd.config import load_config
from qkdd.peering import (
    MAX_PENDING_HANDSHAKES_PER_ADDRESS,
    HandshakeLimiter,
)


def test_limiter_caps_in_all_and_per_address():
    limiter = HandshakeLimiter(total=3, per_address=2)
    assert limiter.try_acquire("a") and limiter.try_acquire("a")
    assert not limiter.try_acquire("a")
    assert limiter.try_acquire("b")
    assert not limiter.try_acquire("c")  # the total cap
    limiter.release("a")
    assert limiter.try_acquire("c")
    limiter.release("a")
    limiter.release("b")
    limiter.release("c")
    assert limiter.try_acquire("a") and limiter.try_acquire("a")


def test_idle_connections_beyond_the_per_address_cap_are_closed(tmp_path):
    """Connections that never send HELLO: the ones over the cap are closed at once."""
    import subprocess
    import sys

    from qkdd.demo import prepare_directory

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
        deadline = time.monotonic() + 20
        while "event=peer_listener_ready" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        for _ in range(MAX_PENDING_HANDSHAKES_PER_ADDRESS + 2):
            clients.append(socket.create_connection(config.listen, timeout=5))
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
        assert daemon.poll() is None
    finally:
        for client in clients:
            client.close()
        daemon.terminate()
        daemon.wait(timeout=20)
