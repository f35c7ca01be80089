"""The device side of an emulated QKD link, over any Trio byte stream.

``DeviceHalf`` runs ``DeviceProtocol`` on one stream (a pty master in the emulator, or in
tests): a reader task feeds received bytes to the protocol, a writer task sends what the
protocol queues (HELLO answers, STATUS heartbeats, KEYS within the window, retransmissions)
and sleeps until the next deadline or until woken. ``EmulatedLink`` pairs two halves with
one ``KeySource``: each block of keys goes into both halves' buffers or into neither, so
both hosts receive the same keys with the same IDs. Generation pauses while either buffer
is full; a key leaves a buffer only when that half's host has acknowledged it. Given the
two sites' IDs, each half tells its host which end of the link it is (IDENTITY).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable

import trio

from ..serial.protocol import (
    DeviceProtocol,
    DeviceState,
    ErrorReceived,
    FrameDropped,
    HostConnected,
    KeysAcked,
    PeerIncompatible,
)
from ..serial.serial_constants import (
    DEFAULT_RETRANSMIT_TIMEOUT,
    DEFAULT_STATUS_INTERVAL,
    DEFAULT_WINDOW,
)
from ..serial.serial_messages import Identity, LinkState
from .key_source import KeySource

__all__ = ["DeviceHalf", "EmulatedLink"]

log = logging.getLogger("qkdd.emulator")

#: Keys drawn from the source at a time when unpaced; large enough to amortise the call.
BLOCK_KEYS = 256
#: Window over which the reported secret key rate is averaged.
RATE_WINDOW = 5.0
#: Pause after a source returned no key, before asking again.
EMPTY_BLOCK_PAUSE = 0.01
#: A paced source may catch up this many seconds of missed keys at once, no more.
MAX_BURST_SECONDS = 1.0

LinkStats = Callable[[], tuple[LinkState, float | None, int | None]]


class DeviceHalf:
    """One QKD device: a bounded key buffer served to one host over one stream."""

    def __init__(
        self,
        name: str,
        *,
        window: int = DEFAULT_WINDOW,
        capacity: int = 4096,
        retransmit_timeout: float = DEFAULT_RETRANSMIT_TIMEOUT,
        status_interval: float = DEFAULT_STATUS_INTERVAL,
        stats: LinkStats | None = None,
        on_room: Callable[[], None] | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.name = name
        self.proto = DeviceProtocol(
            name=name,
            window=window,
            capacity=capacity,
            retransmit_timeout=retransmit_timeout,
            identity=identity,
        )
        self.status_interval = status_interval
        self._stats = stats or (lambda: (LinkState.UP, None, None))
        self._on_room = on_room
        self._wake = trio.Event()
        self._send_lock = trio.Lock()
        self._silenced = False
        self.keys_acked = 0
        self.sessions = 0

    # -- controls (the emulator's producer, and tests) --

    def add_keys(self, keys: list[tuple[bytes, bytes]]) -> None:
        self.proto.add_keys(keys)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    @property
    def silenced(self) -> bool:
        """While True nothing the protocol queues is sent (a device that hangs)."""
        return self._silenced

    @silenced.setter
    def silenced(self, value: bool) -> None:
        self._silenced = value
        self.wake()

    async def send_raw(self, data: bytes, stream: trio.abc.SendStream) -> None:
        """Send bytes outside the protocol (noise on the line), between whole frames."""
        async with self._send_lock:
            await stream.send_all(data)

    # -- serving --

    async def serve(self, stream: trio.abc.Stream, *, announce: bool = True) -> None:
        """Serve one host until the stream breaks or the caller cancels."""
        if announce:
            self.proto.announce()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, stream, nursery.cancel_scope)
                await self._writer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("emulator.stream-closed device=%s reason=%r", self.name, str(exc))

    async def _reader(self, stream: trio.abc.ReceiveStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                for ev in self.proto.receive_data(bytes(data)):
                    self._log_event(ev)
                self.wake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("emulator.stream-closed device=%s reason=%r", self.name, str(exc))
        finally:
            scope.cancel()

    def _log_event(self, ev: object) -> None:
        if isinstance(ev, KeysAcked):
            self.keys_acked += len(ev.key_ids)
            if ev.key_ids and self._on_room is not None:
                self._on_room()
        elif isinstance(ev, HostConnected):
            self.sessions += 1
            log.info(
                "emulator.host-connected device=%s host=%r version=%d window=%d held=%d",
                self.name,
                ev.host_name,
                ev.version,
                ev.window,
                self.proto.held,
            )
        elif isinstance(ev, PeerIncompatible):
            log.warning("emulator.host-incompatible device=%s reason=%r", self.name, ev.reason)
        elif isinstance(ev, ErrorReceived):
            log.warning(
                "emulator.host-error device=%s code=%d detail=%r", self.name, ev.code, ev.detail
            )
        elif isinstance(ev, FrameDropped):
            log.info("emulator.frame-dropped device=%s reason=%r", self.name, ev.reason)

    async def _writer(self, stream: trio.abc.SendStream) -> None:
        next_status = -math.inf
        while True:
            now = trio.current_time()
            ready = self.proto.state is DeviceState.READY
            if ready and now >= next_status:
                self.proto.send_status(*self._stats())
                next_status = now + self.status_interval
            self.proto.poll(now)
            if not self._silenced:
                out = self.proto.data_to_send()
                if out:
                    async with self._send_lock:
                        await stream.send_all(out)
                    continue
            deadline = next_status if ready else math.inf
            retransmit = self.proto.next_deadline()
            if retransmit is not None:
                deadline = min(deadline, retransmit)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()


class EmulatedLink:
    """Two ``DeviceHalf`` objects fed with identical keys from one ``KeySource``."""

    def __init__(
        self,
        source: KeySource,
        *,
        rate: float | None = None,
        buffer: int = 4096,
        window: int = DEFAULT_WINDOW,
        retransmit_timeout: float = DEFAULT_RETRANSMIT_TIMEOUT,
        status_interval: float = DEFAULT_STATUS_INTERVAL,
        names: tuple[str, str] = ("qkd-emulator-a", "qkd-emulator-b"),
        sites: tuple[str, str] | None = None,
    ) -> None:
        """``sites``: the site IDs at end A and end B; each half then says which it is."""
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (omit it for unpaced generation)")
        self.source = source
        self.rate = rate
        self._room = trio.Event()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._started_at: float | None = None
        self.keys_generated = 0
        self.halves = tuple(
            DeviceHalf(
                name,
                window=window,
                capacity=buffer,
                retransmit_timeout=retransmit_timeout,
                status_interval=status_interval,
                stats=self.stats,
                on_room=self._notify_room,
                identity=identity,
            )
            for name, identity in zip(names, _identities(sites), strict=True)
        )

    def _notify_room(self) -> None:
        self._room.set()

    def stats(self) -> tuple[LinkState, float | None, int | None]:
        """(link state, QBER, secret key rate in bit/s) for STATUS."""
        now = trio.current_time()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()
        if self._started_at is None:
            return LinkState.STARTING, self.source.qber, None
        span = min(RATE_WINDOW, max(now - self._started_at, 1e-3))
        bits = sum(b for _, b in self._recent)
        return LinkState.UP, self.source.qber, int(bits / span)

    async def produce(self) -> None:
        """Generate keys into both halves forever, paced and within both buffers."""
        start = self._started_at = trio.current_time()
        produced = 0
        while True:
            room = min(half.proto.room for half in self.halves)
            if room == 0:
                await self._room.wait()
                self._room = trio.Event()
                continue
            n = min(room, BLOCK_KEYS)
            if self.rate is not None:
                now = trio.current_time()
                if (now - start) * self.rate - produced > self.rate * MAX_BURST_SECONDS:
                    # Long pause (buffers were full): do not burst to catch up.
                    start = now - (produced + self.rate * MAX_BURST_SECONDS) / self.rate
                allowed = int((now - start) * self.rate) - produced
                if allowed <= 0:
                    await trio.sleep_until(start + (produced + 1) / self.rate)
                    continue
                n = min(n, allowed)
            block = await self.source.next_block(n)
            block = block[: min(half.proto.room for half in self.halves)]
            if not block:
                await trio.sleep(EMPTY_BLOCK_PAUSE)  # a source with nothing yet: no spin
                continue
            for half in self.halves:
                half.add_keys(block)
            produced += len(block)
            self.keys_generated += len(block)
            self._recent.append((trio.current_time(), sum(len(m) * 8 for _, m in block)))
            await trio.lowlevel.checkpoint()


def _identities(sites: tuple[str, str] | None) -> tuple[Identity | None, Identity | None]:
    if sites is None:
        return None, None
    a, b = sites
    return Identity(a, b), Identity(b, a)
