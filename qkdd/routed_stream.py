"""Routed streams at one site: ``RoutedStream``, one end as a Trio byte stream (the
end-to-end session with a remote site runs over it exactly as over a TCP connection,
``qkdd.peering``), and ``RoutedEnds``, the table of this site's ends, which opens, accepts,
feeds and closes them as ROUTED envelopes come and go through the relay node
(``qkdd.relay_node``). The format and the forwarding decision are ``qkdd.relay.routed``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Awaitable, Callable

import trio

from qkdd.relay.routed import (
    MAX_HOPS,
    MAX_REASON_BYTES,
    STREAM_ID_SIZE,
    Bounce,
    Deliver,
    Forward,
    RouteAction,
    RoutedEnvelope,
    RoutedKind,
    split_data,
)

log = logging.getLogger("qkdd.relay")

# Routed streams a remote site may have open here at once (each carries one dial).
MAX_STREAMS_PER_SITE = 4
# Envelopes of one stream waiting to be read; beyond that the stream is ended (its
# session dials again) rather than hold back the hop session that carries them.
STREAM_QUEUE = 1024
# How long closing a stream waits to tell the far end (its session's heartbeat tells it
# anyway).
CLOSE_SEND_TIMEOUT = 1.0

SendEnvelope = Callable[[RoutedEnvelope], Awaitable[None]]


class NoRoute(OSError):
    """There is no path to the remote site now (a dial fails as if it could not connect)."""


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
        # Set once the session inside has authenticated the far end (a stream opened
        # there before that may be evicted by a newer one).
        self.authenticated = False
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


class RoutedEnds:
    """This site's ends of routed streams, by (opener, stream ID): the streams it dialled
    and those remote sites opened here (handed to ``accept``, the responder). ``route``
    says where an envelope goes (``qkdd.relay.routed.route_envelope`` over the site's
    routes), ``send`` queues a ROUTED body for a neighbour (False: dropped), ``accepts``
    says whether a site may open streams here (a ``[[remote]]``)."""

    def __init__(
        self,
        site_id: str,
        *,
        route: Callable[[RoutedEnvelope], RouteAction],
        send: Callable[[str, bytes], bool],
        accepts: Callable[[str], bool],
    ) -> None:
        self.site_id = site_id
        self._route = route
        self._send = send
        self._accepts = accepts
        self.streams: dict[tuple[str, bytes], RoutedStream] = {}
        self.accept: Callable[[RoutedStream], Awaitable[None]] | None = None
        self.nursery: trio.Nursery | None = None

    def end_rerouted(self, rerouted: Callable[[str], bool]) -> None:
        """End the streams whose next hop changed (their sessions dial again)."""
        for stream in list(self.streams.values()):
            if rerouted(stream.remote):
                stream.ended(f"the route to {stream.remote} changed")

    async def open(self, remote: str) -> RoutedStream:
        """A new routed stream to ``remote`` (the dial of its end-to-end session).
        ``NoRoute`` if no path leads there now."""
        stream = self._new_stream(remote, os.urandom(STREAM_ID_SIZE), opened_here=True)
        try:
            await self._send_from_here(stream.envelope(RoutedKind.OPEN))
        except RoutedStreamClosed as exc:
            self._stream_closed(stream)
            raise NoRoute(str(exc)) from None
        except BaseException:  # cancelled (the dial was abandoned): forget the stream
            self._stream_closed(stream)
            raise
        return stream

    def _new_stream(self, remote: str, stream_id: bytes, *, opened_here: bool) -> RoutedStream:
        stream = RoutedStream(
            self.site_id,
            remote,
            stream_id,
            opened_here=opened_here,
            send_envelope=self._send_from_here,
            on_closed=self._stream_closed,
        )
        self.streams[(self.site_id if opened_here else remote, stream_id)] = stream
        return stream

    def _stream_closed(self, stream: RoutedStream) -> None:
        opener = self.site_id if stream.opened_here else stream.remote
        self.streams.pop((opener, stream.stream_id), None)

    async def _send_from_here(self, envelope: RoutedEnvelope) -> None:
        await trio.lowlevel.checkpoint()
        action = self._route(envelope)
        if isinstance(action, Forward):
            if self._send(action.peer, action.body):
                return
            raise RoutedStreamClosed(f"the session with {action.peer} is down or congested")
        if isinstance(action, Bounce):
            raise RoutedStreamClosed(action.reason)
        raise RoutedStreamClosed("a routed stream to this site itself")

    async def on_envelope(self, envelope: RoutedEnvelope) -> None:
        """A ROUTED envelope that came here: forwarded, bounced or delivered."""
        action = self._route(envelope)
        if isinstance(action, Forward):
            if not self._send(action.peer, action.body):
                await self._bounce(
                    envelope, f"the session from {self.site_id} to {action.peer} is down"
                )
        elif isinstance(action, Bounce):
            if action.envelope is not None:
                log.info(
                    "event=routed_bounced destination=%s reason=%r",
                    envelope.destination,
                    action.reason,
                )
                await self._bounce(envelope, action.reason)
        elif isinstance(action, Deliver):
            await self._deliver(envelope)

    async def _bounce(self, envelope: RoutedEnvelope, reason: str) -> None:
        """Tell the envelope's source its stream cannot go on (best effort)."""
        if envelope.kind is RoutedKind.CLOSE:
            return
        back = envelope.reply(RoutedKind.CLOSE, reason.encode()[:MAX_REASON_BYTES])
        action = self._route(back)
        if isinstance(action, Forward):
            self._send(action.peer, action.body)
        elif isinstance(action, Deliver):
            await self._deliver(back)

    async def _deliver(self, envelope: RoutedEnvelope) -> None:
        key = (envelope.opener, envelope.stream_id)
        stream = self.streams.get(key)
        if envelope.kind is RoutedKind.OPEN:
            if stream is not None:
                return
            problem = self._open_problem(envelope.source)
            if problem is not None:
                log.warning(
                    "event=routed_open_refused remote=%s reason=%r", envelope.source, problem
                )
                await self._bounce(envelope, problem)
                return
            stream = self._new_stream(envelope.source, envelope.stream_id, opened_here=False)
            assert self.nursery is not None and self.accept is not None
            self.nursery.start_soon(self.accept, stream)
        elif stream is not None and stream.remote != envelope.source:
            # Only the stream's far end sends on it (a neighbour that guessed the ID of a
            # stream with another site gets nothing delivered).
            log.warning(
                "event=routed_stream_mismatch stream_with=%s claimed_by=%s",
                stream.remote,
                envelope.source,
            )
        elif envelope.kind is RoutedKind.DATA:
            if stream is None:
                await self._bounce(envelope, f"no such stream at {self.site_id}")
                return
            if not stream.arrived(envelope.payload):
                self.streams.pop(key, None)
                await self._bounce(envelope, f"the stream's reader at {self.site_id} fell behind")
        elif stream is not None:  # CLOSE
            self.streams.pop(key, None)
            stream.ended(envelope.payload.decode("utf-8", "replace") or "closed")

    def _open_problem(self, remote: str) -> str | None:
        """Why a stream ``remote`` opens here is refused, or None. At the limit the oldest
        of its streams still in its handshake makes room (OPENs are not authenticated
        until the handshake inside them is, so they must not lock the real one out)."""
        if not self._accepts(remote) or self.accept is None:
            return f"site {self.site_id} gets no keys with {remote} (not a [[remote]] there)"
        theirs = [
            (key, s) for key, s in self.streams.items() if s.remote == remote and not s.opened_here
        ]
        if len(theirs) < MAX_STREAMS_PER_SITE:
            return None
        waiting = [(key, s) for key, s in theirs if not s.authenticated]
        if not waiting:
            return f"{remote} has {MAX_STREAMS_PER_SITE} routed streams open at {self.site_id}"
        key, oldest = waiting[0]
        del self.streams[key]
        reason = "a newer stream from the same site took its place"
        oldest.ended(reason)
        # Tell its opener now (its dial would otherwise wait out its handshake's timeout).
        action = self._route(oldest.envelope(RoutedKind.CLOSE, reason.encode()))
        if isinstance(action, Forward):
            self._send(action.peer, action.body)
        return None
