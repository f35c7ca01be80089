"""A man in the middle for the qkdd peer protocol: a TCP proxy on 127.0.0.1 that parses the
frames (``version u8 | type u8 | length u32 | body``) going each way, so that one chosen
frame of one connection can be altered, and forwards everything else unchanged.

The dialling side (the link master, the handshake initiator) connects to the proxy; the
proxy connects to the listening side. Directions are named from that: ``A_TO_B`` is
initiator -> responder.

Usage: ``plan(tamper, ...)`` queues one tamper per *future* connection (None: behave);
each ``Tamper`` fires once, on the ``nth`` frame of its connection that matches its
``Target``, after which the proxy forwards faithfully again. ``freeze()`` stops reading
(a silent network), ``cut()`` closes every open connection. Each connection gets a
``Record`` saying whether its tamper fired and who closed it.

The proxy runs in a thread of its own (selector loop); control calls are queued to it, so
tests stay plain synchronous code.
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import re
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from timeouts import timeout

from qkdd.crypto.select import select_backend
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.peer.connection import MODE_SIGNATURE_BOOTSTRAP, Hello
from qkdd.peer.wire import FRAME_HEADER, FRAME_HEADER_SIZE, FrameType, make_frame

A_TO_B = "a->b"
B_TO_A = "b->a"
# How long a frame held back for REORDER waits for its successor before it is let through.
REORDER_HOLD_SECONDS = 1.0


class Action(enum.Enum):
    FLIP_TYPE = "flip-type"  # flip bit 0 of the header's type byte
    FLIP_LENGTH = "flip-length"  # clear the lowest set bit of the header's length
    FLIP_BODY = "flip-body"  # flip bit 0 of the middle body byte
    REPLAY = "replay"  # deliver the frame twice
    REORDER = "reorder"  # deliver the next frame of the same direction first
    DROP = "drop"  # never deliver the frame
    TRUNCATE = "truncate"  # deliver the header and half the body, then close both sides
    INJECT = "inject"  # deliver a forged frame of the same type and size first
    INJECT_HELLO = "inject-hello"  # deliver a forged HELLO first (a second HELLO)
    REFLECT = "reflect"  # also send the frame back to its sender
    DOWNGRADE = "downgrade"  # HELLO only: rewrite a PSK HELLO into a bootstrap HELLO
    CUT = "cut"  # close both sides instead of delivering the frame


@dataclass(frozen=True)
class Target:
    """The ``nth`` frame (from 0) going ``direction`` with this type and a body size in
    [``min_body``, ``max_body``]: sealed link messages are told apart by their size."""

    direction: str
    frame_type: int | None = None
    min_body: int = 0
    max_body: int | None = None
    nth: int = 0

    def matches(self, direction: str, frame_type: int, body_length: int) -> bool:
        return (
            direction == self.direction
            and (self.frame_type is None or frame_type == self.frame_type)
            and body_length >= self.min_body
            and (self.max_body is None or body_length <= self.max_body)
        )


@dataclass(frozen=True)
class Tamper:
    action: Action
    target: Target


@dataclass
class Record:
    """What happened on one proxied connection."""

    tamper: Tamper | None
    number: int = -1
    fired: bool = False
    detail: str = ""
    closed_by: str | None = None  # "a", "b", "proxy" (tamper) or "cut"
    swapped_with: tuple[int, int] | None = None  # REORDER: the (type, body size) sent first
    frames: list[tuple[str, int, int]] = field(default_factory=list)  # direction, type, len
    marks: dict[str, object] = field(default_factory=dict)  # set by the observer
    accepted: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


Observer = Callable[[str, Record], None]


def forged_body(frame_type: int, body: bytes) -> bytes:
    """A frame body of the same type and size as ``body`` whose secrets are the attacker's."""
    if frame_type == FrameType.HELLO:
        return forged_hello(body)
    if frame_type == FrameType.RESPONSE:
        # Keep version and responder ID (so the frame parses), replace the nonce, ML-KEM
        # ciphertext, X25519 share and auth field with random bytes.
        keep = 2 + body[1]
        return body[:keep] + os.urandom(len(body) - keep)
    return os.urandom(len(body))  # FINISH and DATA have no public structure worth keeping


def forged_hello(real_body: bytes) -> bytes:
    """The same HELLO (versions, mode, IDs, PSK ID) with the attacker's nonce and shares."""
    hello = Hello.decode(real_body)
    kem = select_backend("cryptography").kem_generate()
    return Hello(
        hello.versions,
        hello.mode,
        hello.initiator_id,
        hello.responder_id,
        hello.psk_id,
        os.urandom(32),
        kem.public_bytes,
        os.urandom(32),
    ).encode()


def downgraded_hello(real_body: bytes) -> bytes:
    """The HELLO rewritten to ask for a signature bootstrap (mode 1, no PSK ID)."""
    hello = Hello.decode(real_body)
    return Hello(
        hello.versions,
        MODE_SIGNATURE_BOOTSTRAP,
        hello.initiator_id,
        hello.responder_id,
        b"",
        hello.nonce,
        hello.kem_public_key,
        hello.x25519_public,
    ).encode()


class _Connection:
    def __init__(self, a: socket.socket, b: socket.socket, record: Record) -> None:
        self.sockets = {A_TO_B: (a, b), B_TO_A: (b, a)}  # direction -> (source, sink)
        self.buffers = {A_TO_B: bytearray(), B_TO_A: bytearray()}
        self.record = record
        self.matched = 0
        self.hello = b""
        self.held: tuple[str, bytes, float] | None = None
        self.open = True

    def direction_of(self, sock: socket.socket) -> str:
        return A_TO_B if sock is self.sockets[A_TO_B][0] else B_TO_A


class MitmProxy:
    def __init__(self, observer: Observer | None = None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.upstream: tuple[str, int] | None = None
        self.records: list[Record] = []
        self._observer = observer
        self._planned: deque[Record] = deque()
        self._connections: list[_Connection] = []
        self._frozen = False
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mitm-proxy", daemon=True)

    # -- control (from the test's thread) ---------------------------------------------------

    def start(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._thread.start()

    def close(self) -> None:
        self._call(self._shutdown)
        self._thread.join(timeout(5))
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def plan(self, *tampers: Tamper | None) -> list[Record]:
        """Queue one tamper (or None) for each of the next connections, in order."""
        records = [Record(t) for t in tampers]
        self._call(lambda: self._planned.extend(records))
        return records

    def freeze(self) -> None:
        """Stop moving bytes in both directions (connections stay open)."""
        self._call(lambda: setattr(self, "_frozen", True))

    def cut(self) -> None:
        """Close every open connection (bytes held by a freeze are lost) and thaw."""

        def cut_all() -> None:
            for conn in list(self._connections):
                self._close(conn, "cut")
            self._frozen = False

        self._call(cut_all)

    def open_connections(self) -> int:
        result: list[int] = []
        self._call(lambda: result.append(len(self._connections)))
        return result[0]

    def _call(self, command: Callable[[], None]) -> None:
        if not self._thread.is_alive():
            if self.error is not None:
                raise RuntimeError("the proxy thread died") from self.error
            command()
            return
        done = threading.Event()
        self._commands.put((command, done))
        self._wake_w.send(b"x")
        if not done.wait(timeout(5)):
            raise RuntimeError("the proxy thread does not answer")

    # -- the proxy thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                readable = [self._listener, self._wake_r]
                if not self._frozen:
                    for conn in self._connections:
                        readable += [conn.sockets[A_TO_B][0], conn.sockets[B_TO_A][0]]
                ready, _, _ = select.select(readable, [], [], 0.05)
                for sock in ready:
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        self._wake_r.recv(4096)
                    else:
                        self._pump(sock)
                self._run_commands()
                self._release_held()
        except BaseException as exc:  # surfaced by the next control call
            self.error = exc
            raise
        finally:
            for conn in list(self._connections):
                self._close(conn, "proxy")

    def _run_commands(self) -> None:
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            finally:
                done.set()

    def _shutdown(self) -> None:
        self._stop = True

    def _accept(self) -> None:
        a, _ = self._listener.accept()
        record = self._planned.popleft() if self._planned else Record(None)
        record.number = len(self.records)
        self.records.append(record)
        try:
            assert self.upstream is not None
            b = socket.create_connection(self.upstream, timeout=timeout(5))
            b.settimeout(None)
        except OSError as exc:
            a.close()
            if record.tamper is not None:
                # The far site is not listening yet (it may still be starting): no frame
                # passed, so the planned tamper waits for the next connection.
                self.records.pop()
                self._planned.appendleft(record)
                return
            record.detail = f"upstream unreachable: {exc}"
            record.closed_by = "proxy"
            record.done.set()
            return
        for sock in (a, b):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(a, b, record)
        self._connections.append(conn)
        if self._observer is not None:
            self._observer("accept", record)
        record.accepted.set()

    def _pump(self, sock: socket.socket) -> None:
        conn = next((c for c in self._connections if sock in c.sockets[A_TO_B]), None)
        if conn is None or not conn.open:
            return
        direction = conn.direction_of(sock)
        try:
            data = sock.recv(256 * 1024)
        except OSError:
            data = b""
        if not data:
            # The sender closed: deliver what it sent of an unfinished frame, then close.
            rest = bytes(conn.buffers[direction])
            if rest:
                self._send(conn, conn.sockets[direction][1], rest)
            self._close(conn, "a" if direction == A_TO_B else "b")
            return
        buffer = conn.buffers[direction]
        buffer += data
        while conn.open and len(buffer) >= FRAME_HEADER_SIZE:
            _version, _type, length = FRAME_HEADER.unpack_from(buffer)
            end = FRAME_HEADER_SIZE + length
            if len(buffer) < end:
                break
            frame = bytes(buffer[:end])
            del buffer[:end]
            self._on_frame(conn, direction, frame)

    def _on_frame(self, conn: _Connection, direction: str, frame: bytes) -> None:
        header, body = frame[:FRAME_HEADER_SIZE], frame[FRAME_HEADER_SIZE:]
        frame_type = header[1]
        record = conn.record
        record.frames.append((direction, frame_type, len(body)))
        if frame_type == FrameType.HELLO and direction == A_TO_B and not conn.hello:
            conn.hello = body
        sink = conn.sockets[direction][1]
        if conn.held is not None and conn.held[0] == direction:
            held = conn.held[1]
            conn.held = None
            record.swapped_with = (frame_type, len(body))
            self._send(conn, sink, frame + held)
            return
        tamper = record.tamper
        if (
            tamper is not None
            and not record.fired
            and tamper.target.matches(direction, frame_type, len(body))
        ):
            if conn.matched == tamper.target.nth:
                record.fired = True
                record.detail = (
                    f"{tamper.action.value} {direction} type 0x{frame_type:02x} body {len(body)} B"
                )
                self._apply(conn, direction, tamper.action, header, body)
                return
            conn.matched += 1
        self._send(conn, sink, frame)

    def _apply(
        self, conn: _Connection, direction: str, action: Action, header: bytes, body: bytes
    ) -> None:
        source, sink = conn.sockets[direction]
        frame = header + body
        version, frame_type, length = FRAME_HEADER.unpack(header)
        if action is Action.FLIP_TYPE:
            self._send(conn, sink, FRAME_HEADER.pack(version, frame_type ^ 0x01, length) + body)
        elif action is Action.FLIP_LENGTH:
            shorter = length & (length - 1)
            self._send(conn, sink, FRAME_HEADER.pack(version, frame_type, shorter) + body)
        elif action is Action.FLIP_BODY:
            flipped = bytearray(body)
            flipped[len(body) // 2] ^= 0x01
            self._send(conn, sink, header + bytes(flipped))
        elif action is Action.REPLAY:
            self._send(conn, sink, frame + frame)
        elif action is Action.REORDER:
            conn.held = (direction, frame, time.monotonic() + REORDER_HOLD_SECONDS)
        elif action is Action.DROP:
            pass
        elif action is Action.TRUNCATE:
            self._send(conn, sink, header + body[: len(body) // 2])
            self._close(conn, "proxy")
        elif action is Action.INJECT:
            forged = make_frame(frame_type, forged_body(frame_type, body)).encode()
            self._send(conn, sink, forged + frame)
        elif action is Action.INJECT_HELLO:
            forged = make_frame(FrameType.HELLO, forged_hello(conn.hello)).encode()
            self._send(conn, sink, forged + frame)
        elif action is Action.REFLECT:
            self._send(conn, source, frame)
            self._send(conn, sink, frame)
        elif action is Action.DOWNGRADE:
            if frame_type != FrameType.HELLO:
                raise ValueError("only a HELLO can be downgraded")
            self._send(conn, sink, make_frame(frame_type, downgraded_hello(body)).encode())
        elif action is Action.CUT:
            self._close(conn, "proxy")
        else:  # pragma: no cover - every action is handled above
            raise ValueError(action)

    def _release_held(self) -> None:
        for conn in list(self._connections):
            if conn.held is not None and time.monotonic() >= conn.held[2]:
                direction, frame, _ = conn.held
                conn.held = None
                conn.record.detail += "; no successor came, delivered late"
                self._send(conn, conn.sockets[direction][1], frame)

    def _send(self, conn: _Connection, sock: socket.socket, data: bytes) -> None:
        if not conn.open:
            return
        try:
            sock.sendall(data)
        except OSError:
            self._close(conn, "a" if sock is conn.sockets[B_TO_A][1] else "b")

    def _close(self, conn: _Connection, by: str) -> None:
        if not conn.open:
            return
        conn.open = False
        for sock in conn.sockets[A_TO_B]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._connections.remove(conn)
        conn.record.closed_by = by
        if self._observer is not None:
            self._observer("close", conn.record)
        conn.record.done.set()


def unused_port() -> int:
    """A loopback port nothing listens on (a connection to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_peer_address(config: Path, address: str) -> None:
    """Rewrite the (only) peer's ``address`` in a site config."""
    config.write_text(
        re.sub(
            r'^address = ".*"$', f'address = "{address}"', config.read_text(), count=1, flags=re.M
        )
    )


def point_a_at(proxy: MitmProxy) -> Callable[[Path], None]:
    """Site A reaches site B through the proxy. Both sites dial, so site B's address for A
    is made to go nowhere: a dial of B's would bypass the proxy (same IP, so B's reserved
    handshake slots for A are unchanged)."""

    def rewrite(directory: Path) -> None:
        config_b = (directory / f"{SITE_B.site_id}.toml").read_text()
        listen = re.search(r'^listen = "127\.0\.0\.1:(\d+)"', config_b, re.M)
        assert listen is not None
        proxy.start(("127.0.0.1", int(listen.group(1))))
        host, port = proxy.address
        set_peer_address(directory / f"{SITE_A.site_id}.toml", f"{host}:{port}")
        set_peer_address(directory / f"{SITE_B.site_id}.toml", f"127.0.0.1:{unused_port()}")

    return rewrite
