"""A routed stream as a Trio byte stream: the end-to-end session with a remote site runs
over it exactly as over a TCP connection (``qkdd.peering``). Its envelopes go out through
the site's relay node, which hands this end what arrives for it (``qkdd.relay_node``);
the format and the forwarding are ``qkdd.relay.routed``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable

import trio

from qkdd.relay.routed import MAX_HOPS, RoutedEnvelope, RoutedKind, split_data

# Envelopes of one stream waiting to be read; beyond that the stream is ended (its
# session dials again) rather than hold back the hop session that carries them.
STREAM_QUEUE = 1024
# How long closing a stream waits to tell the far end (its session's heartbeat tells it
# anyway).
CLOSE_SEND_TIMEOUT = 1.0

SendEnvelope = Callable[[RoutedEnvelope], Awaitable[None]]


class RoutedStreamClosed(trio.BrokenResourceError):
    """The stream ended: the far end closed it, or a site on the way could not pass it on."""


class RoutedStream(trio.abc.Stream):
    """One end of a routed stream between this site and ``remote``."""

    def __init__(
        self,
        local: str,
        remote: str,
        stream_id: bytes,
        *,
        opened_here: bool,
        send_envelope: SendEnvelope,
        on_closed: Callable[[RoutedStream], None],
    ) -> None:
        self.local = local
        self.remote = remote
        self.stream_id = stream_id
        self.opened_here = opened_here
        self._send_envelope = send_envelope
        self._on_closed = on_closed
        self._to_reader, self._incoming = trio.open_memory_channel[bytes](STREAM_QUEUE)
        self._pending = b""
        self._closed = False
        self.end_reason: str | None = None  # why the far side ended it, once it did
        self._send_lock = trio.StrictFIFOLock()

    def __repr__(self) -> str:
        return f"RoutedStream({self.local!r} <-> {self.remote!r}, {self.stream_id.hex()})"

    def envelope(self, kind: RoutedKind, payload: bytes = b"") -> RoutedEnvelope:
        return RoutedEnvelope(
            self.local, self.remote, MAX_HOPS, kind, self.stream_id, self.opened_here, payload
        )

    # -- what the relay node hands in ----------------------------------------------------

    def arrived(self, payload: bytes) -> bool:
        """The stream's next bytes. False if the reader is ``STREAM_QUEUE`` envelopes
        behind: the stream is then ended (the relay node never waits for a reader)."""
        if self.end_reason is not None or self._closed:
            return True  # nobody reads any more: dropped
        try:
            self._to_reader.send_nowait(payload)
        except trio.WouldBlock:
            self.ended("this end's reader fell behind")
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True

    def ended(self, reason: str) -> None:
        """The far end (or a site on the way) closed the stream."""
        if self.end_reason is None:
            self.end_reason = reason
            self._to_reader.close()

    # -- trio.abc.Stream -----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the routed stream was closed here")
        async with self._send_lock:
            for chunk in split_data(bytes(data)):
                if self.end_reason is not None:
                    raise RoutedStreamClosed(self.end_reason)
                await self._send_envelope(self.envelope(RoutedKind.DATA, chunk))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the routed stream was closed here")
        if not self._pending:
            try:
                self._pending = await self._incoming.receive()
            except trio.EndOfChannel:
                return b""  # the far end closed it: as a TCP peer's FIN
        limit = math.inf if max_bytes is None else max_bytes
        if len(self._pending) <= limit:
            data, self._pending = self._pending, b""
        else:
            cut = int(limit)
            data, self._pending = self._pending[:cut], self._pending[cut:]
        return data

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._incoming.close()
        self._on_closed(self)
        if self.end_reason is None:
            # Tell the far end; if that fails it learns from its session's heartbeat.
            with trio.move_on_after(CLOSE_SEND_TIMEOUT) as scope:
                scope.shield = True
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await self._send_envelope(self.envelope(RoutedKind.CLOSE, b"closed"))
