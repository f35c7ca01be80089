"""Attacks by an unauthenticated client on two real site daemons: forged HELLOs during a
live session, and a flood of idle connections holding the handshake slots while the real
master reconnects. Neither may take the link down or keep the master out."""

from __future__ import annotations

import os
import re
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient
from qkdd.crypto.select import select_backend
from qkdd.demo import RunningSite, exchange_keys, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.peer.admission import MAX_PENDING_HANDSHAKES, MAX_PENDING_HANDSHAKES_PER_ADDRESS
from qkdd.peer.connection import MODE_PSK, MODE_SIGNATURE_BOOTSTRAP, PSK_ID_SIZE, Hello
from qkdd.peer.wire import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    SUPPORTED_VERSIONS,
    FrameType,
    make_frame,
)

# Loopback only: the whole of 127.0.0.0/8 reaches this machine, so each of these is a
# distinct source address to the daemon.
FLOOD_SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
# An address on which no master runs: written into the slave's config for the master, so
# the real master (at 127.0.0.1) is a stranger by address.
ELSEWHERE = "127.0.0.11"


def listen_address(site: RunningSite) -> tuple[str, int]:
    match = re.search(r'^listen = "([\d.]+):(\d+)"', site.config_file.read_text(), re.M)
    assert match is not None
    return match.group(1), int(match.group(2))


def sessions_established(site: RunningSite) -> int:
    return site.log_file.read_text().count("event=session_established")


def peer_status(site: RunningSite, peer: str) -> dict[str, object]:
    with BlockingKeyClient(str(site.socket_path)) as client:
        status: dict[str, object] = client.site_status()["peers"][peer]
    return status


# -- forged HELLOs ----------------------------------------------------------------------


def forged_hello(initiator: str, responder: str, mode: int, psk_id: bytes = b"") -> bytes:
    """A well-formed HELLO naming ``initiator``, with the attacker's own key shares."""
    kem = select_backend("cryptography").kem_generate()
    hello = Hello(
        SUPPORTED_VERSIONS,
        mode,
        initiator,
        responder,
        psk_id,
        os.urandom(32),
        kem.public_bytes,
        os.urandom(32),
    )
    return make_frame(FrameType.HELLO, hello.encode()).encode()


def read_frame(sock: socket.socket) -> bytes | None:
    """One whole frame, or None if the daemon closed the connection first."""
    data = b""
    while len(data) < FRAME_HEADER_SIZE or len(data) < FRAME_HEADER_SIZE + int(
        FRAME_HEADER.unpack_from(data)[2]
    ):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


def forge(address: tuple[str, int], hello: bytes) -> str:
    """Send a forged HELLO; if a RESPONSE comes back, answer it with a forged FINISH. Return
    what the daemon did once it closed the connection."""
    with socket.create_connection(address, timeout=timeout(20)) as sock:
        sock.sendall(hello)
        response = read_frame(sock)
        if response is None:
            return "closed after HELLO"
        assert response[1] == FrameType.RESPONSE
        sock.sendall(make_frame(FrameType.FINISH, os.urandom(64)).encode())
        while sock.recv(65536):
            pass
        return "closed after FINISH"


def current_psk_id(site: RunningSite) -> bytes:
    """The ID of the authentication key the sites share now, from the master's log (an
    attacker on the path reads it in the master's next HELLO)."""
    rotated = re.findall(
        r"event=auth_key_rotated peer=\S+ key=([0-9a-f-]{36})", site.log_file.read_text()
    )
    assert rotated, "no authentication key yet"
    return uuid.UUID(rotated[-1]).bytes


def test_forged_hellos_leave_a_live_session_up(tmp_path: Path) -> None:
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=timeout(60))
        wait_until(lambda: "event=auth_key_rotated" in site_a.log_file.read_text(), "a PSK", 30)
        before = {site.site.site_id: sessions_established(site) for site in (site_a, site_b)}
        psk_id = current_psk_id(site_a)
        outcomes = set()
        for _ in range(3):
            # To the slave, claiming to be the master; to the master, claiming the slave.
            for target, claimed, own in (
                (site_b, SITE_A.site_id, SITE_B.site_id),
                (site_a, SITE_B.site_id, SITE_A.site_id),
            ):
                for hello in (
                    forged_hello(claimed, own, MODE_PSK, os.urandom(PSK_ID_SIZE)),
                    forged_hello(claimed, own, MODE_PSK, psk_id),  # a PSK both sites hold
                    forged_hello(claimed, own, MODE_SIGNATURE_BOOTSTRAP),
                ):
                    outcomes.add(forge(listen_address(target), hello))
        # The slave answered the HELLO naming the real PSK (it cannot tell it from the
        # master's before FINISH), and the forged FINISH failed.
        assert "closed after FINISH" in outcomes
        assert "failed authentication" in site_b.log_file.read_text()

        for site, peer in ((site_a, SITE_B.site_id), (site_b, SITE_A.site_id)):
            status = peer_status(site, peer)
            assert status["session"] == "up", status
            assert sessions_established(site) == before[site.site.site_id], "session replaced"
        rows = exchange_keys(site_a, site_b, 4)
        assert len(rows) == 4 and all(row["match"] for row in rows), rows
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            (key,) = app_a.enc_keys(SITE_B.sae_id, number=1, size=512)
        with BlockingKeyClient(str(site_b.socket_path)) as app_b:
            (same,) = app_b.dec_keys(SITE_A.sae_id, [key.key_id])
        assert same.material == key.material and len(key.material) == 64


# -- a flood of idle connections --------------------------------------------------------


class SlotFlood:
    """Holds ``per_address`` idle connections from each source address to ``target`` and
    opens a new one as soon as the daemon closes one, as an attacker keeping the handshake
    slots full would."""

    def __init__(self, target: tuple[str, int], sources: list[str], per_address: int) -> None:
        self.target = target
        self.sources = sources
        self.per_address = per_address
        self.opened = 0
        self.closed_by_daemon = 0
        self.live = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slot-flood", daemon=True)

    def __enter__(self) -> SlotFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout(10))

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        due: list[tuple[float, str]] = [
            (0.0, source) for source in self.sources for _ in range(self.per_address)
        ]
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for when, source in [d for d in due if d[0] <= now]:
                    due.remove((when, source))
                    sock = socket.socket()
                    sock.bind((source, 0))
                    sock.setblocking(False)
                    sock.connect_ex(self.target)
                    selector.register(sock, selectors.EVENT_READ, source)
                    self.opened += 1
                self.live = len(selector.get_map())
                for key, _ in selector.select(0.02):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(1)
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(sock)
                        sock.close()
                        self.closed_by_daemon += 1
                        # Reconnect at once (a short pause spares the shared test machine).
                        due.append((time.monotonic() + 0.02, key.data))
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            selector.close()


def master_elsewhere(directory: Path) -> None:
    """The slave's config names an address for the master that the master does not use."""
    config_b = directory / f"{SITE_B.site_id}.toml"
    config_b.write_text(
        re.sub(
            r'^address = "127\.0\.0\.1:(\d+)"$',
            rf'address = "{ELSEWHERE}:\1"',
            config_b.read_text(),
            count=1,
            flags=re.M,
        )
    )


@pytest.mark.parametrize(
    "tamper", [None, master_elsewhere], ids=["master-at-its-address", "master-elsewhere"]
)
def test_the_master_gets_back_in_through_a_slot_flood(
    tmp_path: Path, tamper: Callable[[Path], None] | None
) -> None:
    assert len(FLOOD_SOURCES) * MAX_PENDING_HANDSHAKES_PER_ADDRESS >= MAX_PENDING_HANDSHAKES
    with running_demo(tmp_path, tamper=tamper) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=timeout(60))
        before = sessions_established(site_b)
        with SlotFlood(
            listen_address(site_b), FLOOD_SOURCES, MAX_PENDING_HANDSHAKES_PER_ADDRESS
        ) as flood:
            wait_until(lambda: flood.live >= MAX_PENDING_HANDSHAKES, "the flood to fill", 20)
            site_a.restart()  # the master's session ends; it redials into the flood
            wait_until(
                lambda: sessions_established(site_b) > before, "the master's new session", 60
            )
            assert flood.error is None and flood.live > 0, "the flood stopped"
            wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=timeout(60))
            rows = exchange_keys(site_a, site_b, 4)
            assert all(row["match"] for row in rows), rows
        assert flood.error is None
