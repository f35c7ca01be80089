"""``qkd-emulator half``: one half of an emulated BB84 link, for a site host of its own.

Each half exposes one pty (the device side of serial protocol v1, as ``qkd-emulator pty``
does for both) to its site's qkdd, and talks to the other half over one TCP connection,
the emulated fibre plus the classical channel (wire format and state machine:
``fibre_protocol``). ``--role`` picks the protocol side, ``--listen``/``--connect`` only the
TCP side: either role may listen.

Theory of operation. Alice's half simulates a block when Bob asks for one (NEXT, sent only
while Bob's key backlog is below ``--buffer``; Alice also waits for room in hers), sends
Bob's detection record (RECORD), then answers the post-processing requests Bob's worker
thread sends (``postprocessing.bob_postprocess`` with a ``request`` that crosses to the
Trio loop and the TCP connection). A block that produced keys ends with COMMIT/COMMITTED:
Alice hands her keys to her pty first, Bob his after COMMITTED or, if the connection broke
in between, after the next HELLO shows that Alice committed that block. Keys wait in an
outbox until the pty's buffer has room, so nothing is dropped for lack of space.

Connections: the connecting half retries with capped exponential backoff; a listening half
takes one peer at a time, and a new peer whose HELLO checks out replaces the old
connection (the old one may be half-open after a network fault). A connection that goes
silent for ``IDLE_TIMEOUT`` is closed; PING keeps an idle one alive. Halves with different
link parameters, the same role or another wire version refuse each other and exit with
status 2. SIGTERM/SIGINT: ask for no new block, let the block under way finish, wait (at
most ``--drain-timeout``) until the host has acknowledged every key handed to it, exit 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hmac
import json
import logging
import secrets
import signal
import sys
from collections.abc import Awaitable
from dataclasses import dataclass, field

import trio

from ..serial.serial_messages import Identity, LinkState
from .bb84_source import Bb84KeySource
from .device_side import RATE_WINDOW, DeviceHalf
from .fibre_protocol import (
    MAX_RECORD_CLICKS,
    Commit,
    Committed,
    FibreError,
    FibreErrorCode,
    FibreErrorMessage,
    FibreFault,
    FibreHello,
    FibreProtocol,
    HalfRole,
    Message,
    Next,
    ParameterMismatchError,
    PeerRefusedError,
    Ping,
    Record,
    Reply,
    Request,
    canonical_params,
    key_ids_digest,
)
from .physics import simulate_block
from .postprocessing import AliceSession, Msg, PostProcessingError, bob_postprocess
from .ptys import EmulatorError, close_pty_link, open_pty_link
from .simulate import add_link_arguments, key_source_from_args

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_RECONNECT_MAX_DELAY",
    "Half",
    "half_main",
    "link_params_from_args",
    "parse_address",
]

log = logging.getLogger("qkdd.emulator")

#: A connection with nothing to say sends PING this often...
PING_INTERVAL = 2.0
#: ...and one that has heard nothing for this long is closed (several PINGs lost).
IDLE_TIMEOUT = 10.0
#: The peer's HELLO must arrive this long after the TCP connection is up.
HELLO_TIMEOUT = 10.0
#: Reconnect backoff of the connecting half: first delay, doubled after each failure.
RECONNECT_INITIAL_DELAY = 0.25
#: Post-processing messages Alice answers on the event loop rather than in a thread.
CASCADE_KIND = bytes([Msg.CASCADE])
#: Cap of that backoff unless --reconnect-max-delay says otherwise.
DEFAULT_RECONNECT_MAX_DELAY = 5.0
#: SIGTERM waits at most this long (--drain-timeout) for the host to take its keys.
DEFAULT_DRAIN_TIMEOUT = 5.0
#: How often the shutdown drain looks at the backlog...
DRAIN_POLL = 0.05
#: ...and after how long without an acknowledgement it decides no host is attached (a
#: host acknowledges a window of keys within milliseconds).
DRAIN_STALL = 1.0


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{port!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError("port must be 0..65535")
    return host, number


def link_params_from_args(args: argparse.Namespace) -> bytes:
    """What both halves must agree on: every link flag (by flag name) plus --key-bits and
    --physics, as canonical JSON. Taken from ``add_link_arguments`` itself, so a flag
    added there is compared without a change here."""
    scratch = argparse.ArgumentParser(add_help=False)
    add_link_arguments(scratch)
    params: dict[str, object] = {
        action.option_strings[0]: getattr(args, action.dest)
        for action in scratch._actions
        if action.option_strings
    }
    params["--key-bits"] = args.key_bits
    params["--physics"] = args.physics
    return canonical_params(params)


class KeyFeed:
    """Committed keys on their way to the pty's device buffer, oldest first."""

    def __init__(self, device: DeviceHalf, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        self._outbox: collections.deque[tuple[bytes, bytes]] = collections.deque()
        # Two tasks wait for changes (the feeder and the block loop): a parking lot wakes
        # them all, where a shared Event replaced by one waiter would lose the other's.
        self._changed = trio.lowlevel.ParkingLot()
        self.keys_delivered = 0

    @property
    def backlog(self) -> int:
        """Keys handed over and not yet acknowledged by the host."""
        return len(self._outbox) + self.device.proto.held

    def notify(self) -> None:
        self._changed.unpark_all()

    def deliver(self, keys: list[tuple[bytes, bytes]]) -> None:
        self._outbox.extend(keys)
        self.keys_delivered += len(keys)
        self.notify()

    async def _wait_change(self) -> None:
        await self._changed.park()

    async def feed(self) -> None:
        """Move keys into the device buffer as it makes room (forever)."""
        while True:
            room = self.device.proto.room
            if self._outbox and room:
                n = min(room, len(self._outbox))
                self.device.add_keys([self._outbox.popleft() for _ in range(n)])
                continue
            await self._wait_change()

    async def wait_room(self) -> None:
        """Until the backlog is below the buffer size: room for (most of) another block."""
        while self.backlog >= self.capacity:
            await self._wait_change()


@dataclass
class _Pending:
    """Bob's keys of a block he asked Alice to commit, not yet handed to his pty."""

    alice_instance: bytes
    seq: int
    keys: list[tuple[bytes, bytes]] = field(repr=False)


class _FibreConnection:
    """The Trio side of one TCP connection: frames through ``FibreProtocol``, one
    sender at a time, PINGs when idle, and every I/O failure turned into ``FibreFault``."""

    def __init__(self, stream: trio.abc.Stream, proto: FibreProtocol) -> None:
        self.stream = stream
        self.proto = proto
        self._lock = trio.Lock()
        self._queue: collections.deque[Message] = collections.deque()
        self._last_send = trio.current_time()
        self.broken: FibreFault | None = None

    async def send(self, msg: Message) -> None:
        async with self._lock:
            data = self.proto.send(msg)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise FibreFault(f"connection lost while sending: {exc}") from None
            self._last_send = trio.current_time()

    async def receive(self) -> Message:
        """The next message other than PING; raises FibreFault if the peer goes silent."""
        while True:
            while self._queue:
                msg = self._queue.popleft()
                if not isinstance(msg, Ping):
                    return msg
            data: bytes | bytearray = b""
            with trio.move_on_after(IDLE_TIMEOUT):
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise FibreFault(f"connection lost: {exc}") from None
                if not data:
                    raise FibreFault("the peer half closed the connection")
            if not data:
                raise FibreFault(f"the peer half was silent for {IDLE_TIMEOUT:g} s")
            self._queue.extend(self.proto.receive_data(bytes(data)))

    async def keepalive(self, scope: trio.CancelScope) -> None:
        """PING whenever nothing was sent for a while; a failed PING ends the connection."""
        try:
            while True:
                await trio.sleep_until(self._last_send + PING_INTERVAL)
                if trio.current_time() >= self._last_send + PING_INTERVAL:
                    await self.send(Ping())
        except FibreFault as exc:
            self.broken = exc
            scope.cancel()


class Half:
    """One half's state for the life of the process: its pty device, the outbox, and the
    block bookkeeping that must survive a reconnect (Alice's last committed block, Bob's
    pending one)."""

    def __init__(
        self,
        role: HalfRole,
        source: Bb84KeySource,
        params: bytes,
        *,
        buffer: int = 4096,
        window: int = 128,
        retransmit_timeout: float = 2.0,
        status_interval: float = 1.0,
        identity: Identity | None = None,
    ) -> None:
        self.role = role
        self.source = source
        self.params = params
        self.instance = secrets.token_bytes(16)
        self.device = DeviceHalf(
            f"qkd-emulator-{role.name.lower()}",
            window=window,
            capacity=buffer,
            retransmit_timeout=retransmit_timeout,
            status_interval=status_interval,
            stats=self.stats,
            on_room=self._on_room,
            identity=identity,
        )
        self.feed = KeyFeed(self.device, buffer)
        self.seq = 0  # Alice: last block simulated by this process
        self.committed = 0  # Alice: last block handed to her pty
        self.pending: _Pending | None = None  # Bob
        self.in_block = False
        self.stopping = False
        self.connected = False
        self.blocks = 0
        self.qber: float | None = None
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._paced_since: float | None = None
        self._paced_bits = 0
        self._conn_lock = trio.Lock()
        self._conn_scope: trio.CancelScope | None = None

    def _on_room(self) -> None:
        self.feed.notify()

    def stats(self) -> tuple[LinkState, float | None, int | None]:
        """(link state, QBER, secret key rate in bit/s) for STATUS."""
        if not self.connected:
            return LinkState.DOWN, self.qber, None
        if not self.blocks:
            return LinkState.STARTING, self.qber, None
        now = trio.current_time()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()
        return LinkState.UP, self.qber, int(sum(b for _, b in self._recent) / RATE_WINDOW)

    def _hand_over(self, keys: list[tuple[bytes, bytes]]) -> None:
        self.feed.deliver(keys)
        self._recent.append((trio.current_time(), sum(len(m) * 8 for _, m in keys)))
        if self.source.rate_bits_per_s is not None:
            self._paced_bits += sum(len(m) * 8 for _, m in keys)

    # -- one connection --

    def _hello(self) -> FibreHello:
        committed = self.committed if self.role is HalfRole.ALICE else 0
        return FibreHello(self.role, self.instance, committed, self.params)

    async def run_connection(self, stream: trio.abc.Stream) -> bool:
        """Serve one peer connection until it fails (logged) or the half stops. Returns
        whether the handshake completed; raises ``FibreError`` if the halves must not
        talk at all (``ParameterMismatchError``, or the peer refused our parameters)."""
        conn = _FibreConnection(stream, FibreProtocol(self.role, self.params))
        try:
            if self.role is HalfRole.BOB:
                await conn.send(self._hello())  # Bob speaks first (see below for Alice)
            with trio.fail_after(HELLO_TIMEOUT):
                peer = await conn.receive()
            assert isinstance(peer, FibreHello)  # the protocol accepts nothing else first
        except ParameterMismatchError as exc:
            with contextlib.suppress(FibreError):
                await conn.send(FibreErrorMessage(FibreErrorCode.CONFIGURATION, str(exc)))
            raise
        except PeerRefusedError as exc:
            if exc.fatal:
                raise
            log.warning("half.refused reason=%r", str(exc))
            return False
        except (FibreFault, trio.TooSlowError) as exc:
            log.warning("half.handshake-failed reason=%r", str(exc) or "HELLO timeout")
            return False
        # A listening half may still be serving the previous connection of this peer:
        # stop it, and only then look at the block state it may have changed.
        if self._conn_scope is not None:
            self._conn_scope.cancel()
        async with self._conn_lock:
            with trio.CancelScope() as scope:
                self._conn_scope = scope
                try:
                    await self._serve(conn, peer)
                except (FibreFault, PeerRefusedError, PostProcessingError) as exc:
                    if isinstance(exc, PeerRefusedError) and exc.fatal:
                        raise
                    if isinstance(exc, PostProcessingError):
                        with contextlib.suppress(FibreError):
                            await conn.send(FibreErrorMessage(FibreErrorCode.PROTOCOL, str(exc)))
                    log.warning("half.disconnected reason=%r", str(exc))
                finally:
                    self.connected = False
                    if self.in_block:
                        # Nothing of it was handed over (a COMMIT still pending is
                        # settled by the next HELLO).
                        log.warning(
                            "half.block-interrupted state=%s last-seq=%d",
                            conn.proto.state.value,
                            conn.proto.seq,
                        )
                        self.in_block = False
                    if self._conn_scope is scope:
                        self._conn_scope = None
        return True

    async def _serve(self, conn: _FibreConnection, peer: FibreHello) -> None:
        if self.role is HalfRole.ALICE:
            # Alice's HELLO says which block she committed last, so it is sent only now
            # that no older connection can commit one any more.
            await conn.send(self._hello())
        else:
            self._resolve_pending(peer)
        self.connected = True
        log.info("half.connected role=%s peer-instance=%s", self.role.name, peer.instance.hex())
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.keepalive, nursery.cancel_scope)
            try:
                if self.role is HalfRole.ALICE:
                    await self._alice(conn)
                else:
                    await self._bob(conn, peer)
            except (FibreError, PostProcessingError) as exc:
                failure = exc  # raised below, not as an exception group of the nursery
            nursery.cancel_scope.cancel()
        if failure is None:
            failure = conn.broken
        if failure is not None:
            raise failure

    def _resolve_pending(self, alice: FibreHello) -> None:
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        same = hmac.compare_digest(pending.alice_instance, alice.instance)
        if same and alice.committed == pending.seq:
            self._hand_over(pending.keys)
            self.blocks += 1
            log.info("half.pending-committed seq=%d keys=%d", pending.seq, len(pending.keys))
        else:
            log.warning("half.block-dropped seq=%d reason='not committed by Alice'", pending.seq)

    # -- Alice --

    async def _pace(self) -> None:
        rate = self.source.rate_bits_per_s
        if rate is None:
            return
        now = trio.current_time()
        if self._paced_since is None:
            self._paced_since = now
        await trio.sleep_until(self._paced_since + self._paced_bits / rate)

    async def _alice(self, conn: _FibreConnection) -> None:
        session: AliceSession | None = None
        while True:
            msg = await conn.receive()
            if isinstance(msg, Next):
                if session is not None:  # the previous block gave no key
                    self._finish_block(session.report.qber_estimate)
                session = None
                self.in_block = False
                if self.stopping:
                    return
                await self.feed.wait_room()
                await self._pace()
                src = self.source
                block = await trio.to_thread.run_sync(
                    simulate_block, src.link, src.block_pulses, src.rng
                )
                self.seq += 1
                session = AliceSession(block.alice, src.post, src.link, block.decoy)
                self.in_block = True
                await conn.send(Record(self.seq, block.pulses, block.decoy, block.bob))
            elif isinstance(msg, Request):
                assert session is not None
                if msg.message[:1] == CASCADE_KIND:
                    # Cascade's many small round trips: a thread hop would cost more
                    # than the parity computation it moves off the loop.
                    reply = session.handle(msg.message)
                else:
                    reply = await trio.to_thread.run_sync(session.handle, msg.message)
                await conn.send(Reply(msg.seq, reply))
            elif isinstance(msg, Commit):
                assert session is not None
                keys = session.outcome.keys if session.outcome is not None else []
                if not (
                    keys
                    and msg.keys == len(keys)
                    and hmac.compare_digest(msg.ids_digest, key_ids_digest(keys))
                ):
                    raise FibreFault(
                        f"Bob's keys of block {msg.seq} are not Alice's; the block is dropped"
                    )
                # Hand over first, then answer: a COMMITTED lost on the way is recovered
                # from the next HELLO, a key handed over without it could not be.
                self._hand_over(keys)
                self.committed = msg.seq
                self._finish_block(session.report.qber_estimate)
                session = None
                self.in_block = False
                await conn.send(Committed(msg.seq))

    def _finish_block(self, qber: float | None) -> None:
        self.blocks += 1
        if qber is not None:
            self.qber = qber

    # -- Bob --

    async def _request(self, conn: _FibreConnection, seq: int, message: bytes) -> bytes:
        await conn.send(Request(seq, message))
        reply = await conn.receive()
        assert isinstance(reply, Reply)
        return reply.message

    async def _bob(self, conn: _FibreConnection, alice: FibreHello) -> None:
        while not self.stopping:
            await self.feed.wait_room()
            if self.stopping:
                return
            await conn.send(Next())
            self.in_block = True
            record = await conn.receive()
            assert isinstance(record, Record)
            src = self.source

            def request(message: bytes, seq: int = record.seq) -> bytes:
                return trio.from_thread.run(self._request, conn, seq, message)

            outcome = await trio.to_thread.run_sync(
                bob_postprocess, record.bob, request, src.post, src.link, record.decoy
            )
            if outcome.report.qber_estimate is not None:
                self.qber = outcome.report.qber_estimate
            if not outcome.keys:
                self.blocks += 1
                self.in_block = False
                continue
            self.pending = _Pending(alice.instance, record.seq, outcome.keys)
            await conn.send(Commit(record.seq, len(outcome.keys), key_ids_digest(outcome.keys)))
            done = await conn.receive()
            assert isinstance(done, Committed)
            self.pending = None
            self._hand_over(outcome.keys)
            self.blocks += 1
            self.in_block = False

    # -- shutdown --

    async def drain(self, timeout: float) -> None:
        """Stop asking for blocks; wait for the block under way and for the host to
        acknowledge every key handed over (unless none does), within ``timeout``."""
        self.stopping = True
        self.feed.notify()
        with trio.move_on_after(timeout):
            backlog, since = self.feed.backlog, trio.current_time()
            while self.in_block or self.feed.backlog:
                if self.feed.backlog != backlog:
                    backlog, since = self.feed.backlog, trio.current_time()
                elif not self.in_block and trio.current_time() - since > DRAIN_STALL:
                    log.warning("half.drain-stalled backlog=%d", self.feed.backlog)
                    return  # no host is taking keys: nothing to wait for
                await trio.sleep(DRAIN_POLL)
        log.info("half.drained backlog=%d in-block=%s", self.feed.backlog, self.in_block)


# -- the process --


async def _connector(half: Half, host: str, port: int, max_delay: float) -> None:
    delay = RECONNECT_INITIAL_DELAY
    while not half.stopping:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            log.info("half.connect-failed peer=%s:%d reason=%r", host, port, exc.strerror)
        else:
            try:
                if await half.run_connection(stream):
                    delay = RECONNECT_INITIAL_DELAY
            finally:
                await trio.aclose_forcefully(stream)
        if half.stopping:
            return
        await trio.sleep(delay)
        delay = min(delay * 2, max_delay)


async def run_half(args: argparse.Namespace) -> None:
    role = HalfRole.ALICE if args.role == "alice" else HalfRole.BOB
    try:
        source = key_source_from_args(args)
    except ValueError as exc:
        raise EmulatorError(str(exc)) from None
    half = Half(
        role,
        source,
        link_params_from_args(args),
        buffer=args.buffer,
        window=args.window,
        retransmit_timeout=args.retransmit_timeout,
        status_interval=args.status_interval,
        identity=Identity(args.site, args.peer_site) if args.site else None,
    )
    fatal: list[FibreError] = []
    ready: dict[str, object] = {"role": args.role, "link": args.link}
    listeners: list[trio.SocketListener] = []
    if args.listen is not None:
        host, port = args.listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise EmulatorError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        ready["listen"] = f"{host}:{listeners[0].socket.getsockname()[1]}"
    else:
        ready["connect"] = "{}:{}".format(*args.connect)
    # Signal handling is installed before "ready" so a prompt SIGTERM still exits cleanly.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        pty = open_pty_link(args.link)
        stream = trio.lowlevel.FdStream(pty.master)
        try:
            async with trio.open_nursery() as nursery:

                async def stop_on_fatal(job: Awaitable[object]) -> None:
                    # A configuration refusal ends the process: not an exception group.
                    try:
                        await job
                    except FibreError as exc:
                        fatal.append(exc)
                        nursery.cancel_scope.cancel()

                async def serve_peer(peer: trio.abc.Stream) -> None:
                    async with peer:
                        await stop_on_fatal(half.run_connection(peer))

                if listeners:
                    nursery.start_soon(trio.serve_listeners, serve_peer, listeners)
                else:
                    host, port = args.connect
                    nursery.start_soon(
                        stop_on_fatal, _connector(half, host, port, args.reconnect_max_delay)
                    )
                nursery.start_soon(half.feed.feed)
                nursery.start_soon(half.device.serve, stream)
                print(json.dumps(ready) if args.json else "ready", flush=True)
                async for signum in signals:
                    log.info("half.stopping signal=%s", signal.Signals(signum).name)
                    await half.drain(args.drain_timeout)
                    nursery.cancel_scope.cancel()
                    break
        finally:
            await trio.aclose_forcefully(stream)
            close_pty_link(pty, close_master=False)
            for listener in listeners:
                await trio.aclose_forcefully(listener)
    if fatal:
        raise fatal[0]


def check_half_args(args: argparse.Namespace) -> str | None:
    """An operator message if the flags cannot work together, else None."""
    if bool(args.site) != bool(args.peer_site):
        return "give both --site and --peer-site, or neither"
    if args.block_detections > MAX_RECORD_CLICKS // 2:
        return (
            f"--block-detections {args.block_detections} is too large for the link between "
            f"halves (at most {MAX_RECORD_CLICKS // 2})"
        )
    return None


def half_main(args: argparse.Namespace) -> int:
    """Run one half until SIGTERM/SIGINT (0), or refuse: 2 with the reason on stderr."""
    problem = check_half_args(args)
    if problem is not None:
        print(f"qkd-emulator half: {problem}", file=sys.stderr)
        return 2
    try:
        trio.run(run_half, args)
    except (EmulatorError, FibreError) as exc:
        print(f"qkd-emulator half: {exc}", file=sys.stderr)
        return 2
    return 0
