"""The link master gives up a responder that goes silent, wherever it stalls: before
accepting the TCP connection, after accepting it, or part-way through RESPONSE. The
handshake timeout is made short here; the real one is HANDSHAKE_TIMEOUT."""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from timeouts import timeout

from qkdd.config import load_config
from qkdd.crypto import KEM_CIPHERTEXT_SIZE, SIGNATURE_SIZE, X25519_KEY_SIZE
from qkdd.crypto.select import select_backend
from qkdd.demo import prepare_directory
from qkdd.demo_sites import SITE_B
from qkdd.identity import load_identity, read_key_encryption_key
from qkdd.keystore import KeyStore
from qkdd.peer.bootstrap import DialAuth
from qkdd.peer.connection import MAC_SIZE, MODE_PSK, AuthKey
from qkdd.peer.wire import FRAME_HEADER, NONCE_SIZE, FrameType, make_frame
from qkdd.peering import PeerLink

SHORT_HANDSHAKE_TIMEOUT = 0.5
STALLS = [
    "syn-unanswered",
    "silent",
    "response-first-byte",
    "response-middle",
    "response-last-byte",
]


def response_bytes(mode: int) -> bytes:
    """A RESPONSE frame of the right size for ``mode`` (its content never matters: it is
    never finished)."""
    auth = MAC_SIZE if mode == MODE_PSK else SIGNATURE_SIZE
    body_size = 1 + 1 + len(SITE_B.site_id) + NONCE_SIZE + KEM_CIPHERTEXT_SIZE + X25519_KEY_SIZE
    return make_frame(FrameType.RESPONSE, os.urandom(body_size + auth)).encode()


def stalled_part(stall: str, mode: int) -> bytes:
    response = response_bytes(mode)
    return {
        "silent": b"",
        "response-first-byte": response[:1],
        "response-middle": response[: len(response) // 2],
        "response-last-byte": response[:-1],
    }[stall]


@dataclasses.dataclass
class SilentServer:
    address: tuple[str, int]
    initiator_closed: trio.Event
    hello_mode: list[int]


@pytest.fixture
def master(tmp_path: Path) -> Iterator[tuple[PeerLink, KeyStore]]:
    config = load_config(prepare_directory(tmp_path)["site-a"])
    backend = select_backend("cryptography")
    store = KeyStore(tmp_path / "store.db", read_key_encryption_key(config.key_encryption_key))
    link = PeerLink(
        config,
        config.peers[0],
        store=store,
        backend=backend,
        signing_key=load_identity(config.identity_key, backend),
        handshake_timeout=SHORT_HANDSHAKE_TIMEOUT,
    )
    try:
        yield link, store
    finally:
        store.close()


def full_backlog_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, with its accept queue full: the kernel drops every
    further SYN, so a connect to it hangs (a host that went silent at the TCP level)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    while True:
        filler = socket.socket()
        filler.settimeout(0.3)
        fillers.append(filler)
        try:
            filler.connect(listener.getsockname())
        except TimeoutError:
            return listener, fillers


async def serve_silently(
    stall: str, task_status: trio.TaskStatus[SilentServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Accept, read the initiator's HELLO, send part of a RESPONSE (or nothing), and wait
    for the initiator to close."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = SilentServer(listeners[0].socket.getsockname()[:2], trio.Event(), [])

    async def handle(stream: trio.SocketStream) -> None:
        hello = b""
        while len(hello) < FRAME_HEADER.size or len(hello) < FRAME_HEADER.size + int(
            FRAME_HEADER.unpack_from(hello)[2]
        ):
            hello += await stream.receive_some(65536)
        body = hello[FRAME_HEADER.size :]
        mode = body[1 + body[0]]  # after the version list
        server.hello_mode.append(mode)
        await stream.send_all(stalled_part(stall, mode))
        while await stream.receive_some(65536):
            pass
        server.initiator_closed.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(server)


@pytest.mark.parametrize("mode", ["bootstrap", "psk"])
@pytest.mark.parametrize("stall", STALLS)
def test_the_initiator_gives_up_a_silent_responder(
    master: tuple[PeerLink, KeyStore], stall: str, mode: str
) -> None:
    link, _store = master
    if mode == "psk":
        psk = AuthKey(str(uuid.uuid4()), os.urandom(32))
        link._initiator_auth_key = lambda: (psk, DialAuth.PSK)  # type: ignore[method-assign]

    async def scenario() -> None:
        with trio.fail_after(timeout(20)):
            async with trio.open_nursery() as nursery:
                server = None
                if stall == "syn-unanswered":
                    address = silent_host.getsockname()
                else:
                    server = await nursery.start(serve_silently, stall)
                    address = server.address
                link.peer = dataclasses.replace(link.peer, address=address)
                nursery.start_soon(link.dial_forever)
                if server is not None:
                    await server.initiator_closed.wait()
                    assert server.hello_mode[0] == (MODE_PSK if mode == "psk" else 1)
                while "timed out" not in link.last_error:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    silent_host, fillers = full_backlog_listener()
    try:
        trio.run(scenario)
    finally:
        for sock in [silent_host, *fillers]:
            sock.close()
    assert not link.session_up
