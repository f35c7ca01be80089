"""Routed stream ends (qkdd.routed_stream): ``RoutedEnds`` of three sites on a line a-b-c,
wired together in memory as the relay node wires them (routes from ``compute_routes``,
``route_envelope`` deciding, a ``send`` that queues a ROUTED body for a neighbour without
waiting, a pump per site decoding what arrives into ``on_envelope``). A stream carries bytes
both ways and ends at the far end when one end closes it; an open without a route fails as
NoRoute and, like a cancelled one, leaves nothing behind; a refused OPEN, an OPEN over the
per-site limit, a reader that falls behind and a changed route each end exactly the streams
they should, and envelopes that do not come from a stream's far end are ignored."""

from __future__ import annotations

import math
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import pytest
import trio
from timeouts import timeout

from qkdd.relay.relay_routes import compute_routes
from qkdd.relay.routed import (
    MAX_HOPS,
    MAX_ROUTED_DATA,
    RouteAction,
    RoutedEnvelope,
    RoutedKind,
    decode_routed,
    route_envelope,
)
from qkdd.routed_stream import (
    MAX_STREAMS_PER_SITE,
    STREAM_QUEUE,
    NoRoute,
    RoutedEnds,
    RoutedStream,
    RoutedStreamClosed,
)

LINE = {"a": {"b": 1}, "b": {"a": 1, "c": 1}, "c": {"b": 1}}
# ROUTED bodies a site's pump may have waiting (enough that only what a test breaks drops).
SITE_QUEUE = 4 * STREAM_QUEUE
HANG = 20.0

EVICTED = "a newer stream from the same site took its place"


class Line:
    """Sites a-b-c: each one's ``RoutedEnds``, the streams it accepted, and the switches a
    test turns to break a hop (``up``: the sessions a site's routes see up; ``broken``:
    (site, neighbour) pairs whose ``send`` refuses, as a full or closed send queue)."""

    def __init__(self, nursery: trio.Nursery, accepts: Mapping[str, set[str]]) -> None:
        self.up = {site: set(neighbours) for site, neighbours in LINE.items()}
        self.broken: set[tuple[str, str]] = set()
        self.ends: dict[str, RoutedEnds] = {}
        self._inbound: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._accepted: dict[str, trio.MemoryReceiveChannel[RoutedStream]] = {}
        for site in LINE:
            inbound, pumped = trio.open_memory_channel[bytes](SITE_QUEUE)
            to_test, accepted = trio.open_memory_channel[RoutedStream](math.inf)
            self._inbound[site] = inbound
            self._accepted[site] = accepted
            ends = RoutedEnds(
                site,
                route=self._router(site),
                send=self._sender(site),
                accepts=accepts.get(site, set()).__contains__,
            )
            ends.accept = to_test.send
            ends.nursery = nursery
            self.ends[site] = ends
            nursery.start_soon(self._pump, site, pumped)

    def _router(self, site: str) -> Callable[[RoutedEnvelope], RouteAction]:
        routes = compute_routes(LINE, site)

        def route(envelope: RoutedEnvelope) -> RouteAction:
            return route_envelope(envelope, site, routes, frozenset(self.up[site]))

        return route

    def _sender(self, site: str) -> Callable[[str, bytes], bool]:
        def send(peer: str, body: bytes) -> bool:
            if (site, peer) in self.broken:
                return False
            try:
                self._inbound[peer].send_nowait(body)
            except trio.WouldBlock:
                return False
            return True

        return send

    async def _pump(self, site: str, pumped: trio.MemoryReceiveChannel[bytes]) -> None:
        async for body in pumped:
            await self.ends[site].on_envelope(decode_routed(body))

    def inject(self, site: str, envelope: RoutedEnvelope) -> None:
        """An envelope arriving at ``site`` from a neighbour, behind what is already queued."""
        self._inbound[site].send_nowait(envelope.encode())

    async def accepted(self, site: str) -> RoutedStream:
        return await self._accepted[site].receive()

    def nothing_accepted(self, site: str) -> bool:
        return self._accepted[site].statistics().current_buffer_used == 0


EVERYONE = {site: set(LINE) - {site} for site in LINE}


@asynccontextmanager
async def line(accepts: Mapping[str, set[str]] = EVERYONE) -> AsyncIterator[Line]:
    with trio.fail_after(timeout(HANG)):  # only catches a hang
        async with trio.open_nursery() as nursery:
            yield Line(nursery, accepts)
            nursery.cancel_scope.cancel()


async def connect(
    net: Line, opener: str = "a", remote: str = "c"
) -> tuple[RoutedStream, RoutedStream]:
    """A stream from ``opener`` to ``remote``: both ends."""
    here = await net.ends[opener].open(remote)
    there = await net.accepted(remote)
    assert there.stream_id == here.stream_id
    return here, there


async def receive_exactly(stream: RoutedStream, size: int) -> list[bytes]:
    chunks: list[bytes] = []
    while sum(map(len, chunks)) < size:
        chunk = await stream.receive_some()
        assert chunk, f"the stream ended after {sum(map(len, chunks))} of {size} bytes"
        chunks.append(chunk)
    return chunks


async def ended(stream: RoutedStream) -> str | None:
    """Read what is left until the stream ends there; why it ended."""
    while await stream.receive_some():
        pass
    return stream.end_reason


# -- 1. bytes both ways, then a close ----------------------------------------------------


@pytest.mark.parametrize("closer", ["opener", "acceptor"])
async def test_a_stream_carries_bytes_both_ways_and_a_close_ends_the_far_end(
    closer: str,
) -> None:
    async with line() as net:
        at_a, at_c = await connect(net)
        assert (at_a.remote, at_a.opened_here) == ("c", True)
        assert (at_c.remote, at_c.opened_here) == ("a", False)
        assert net.ends["b"].streams == {}  # a relay holds no ends

        # More than one DATA envelope each way, both ways at once.
        there = os.urandom(3 * MAX_ROUTED_DATA + 17)
        back = os.urandom(2 * MAX_ROUTED_DATA + 1)
        async with trio.open_nursery() as senders:
            senders.start_soon(at_a.send_all, there)
            senders.start_soon(at_c.send_all, memoryview(back))
        for stream, sent in ((at_c, there), (at_a, back)):
            chunks = await receive_exactly(stream, len(sent))
            assert b"".join(chunks) == sent
            assert max(map(len, chunks)) <= MAX_ROUTED_DATA

        # receive_some(max_bytes) never returns more; the rest waits for the next call.
        await at_a.send_all(b"0123456789")
        pieces: list[bytes] = []
        while sum(map(len, pieces)) < 10:
            piece = await at_c.receive_some(4)
            assert 0 < len(piece) <= 4
            pieces.append(piece)
        assert b"".join(pieces) == b"0123456789"

        closing, other = (at_a, at_c) if closer == "opener" else (at_c, at_a)
        await closing.aclose()
        assert await other.receive_some() == b""
        assert other.end_reason == "closed"
        with pytest.raises(trio.BrokenResourceError) as info:
            await other.send_all(b"too late")
        assert isinstance(info.value, RoutedStreamClosed)
        with pytest.raises(trio.ClosedResourceError):
            await closing.send_all(b"too late")
        with pytest.raises(trio.ClosedResourceError):
            await closing.receive_some()
        assert net.ends["a"].streams == {} and net.ends["c"].streams == {}
        await other.aclose()  # closing an ended stream sends nothing and raises nothing


# -- 2. opens that fail --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("unknown site", "site a has no route to z"),
        ("next hop down", "the session from a to b is down"),
        ("send refused", "the session with b is down or congested"),
    ],
)
async def test_an_open_without_a_way_there_is_no_route_and_leaves_no_stream(
    breakage: str, reason: str
) -> None:
    async with line() as net:
        remote = "z" if breakage == "unknown site" else "c"
        if breakage == "next hop down":
            net.up["a"].discard("b")
        elif breakage == "send refused":
            net.broken.add(("a", "b"))
        with pytest.raises(NoRoute) as info:
            await net.ends["a"].open(remote)
        assert isinstance(info.value, OSError)
        assert str(info.value) == reason
        assert net.ends["a"].streams == {}


async def test_an_open_cancelled_while_sending_its_open_leaves_no_stream() -> None:
    async with line() as net:
        with trio.CancelScope() as scope:
            scope.cancel()  # the dial is abandoned: its OPEN's first checkpoint raises
            await net.ends["a"].open("c")
        assert scope.cancelled_caught
        assert net.ends["a"].streams == {}
        # Nothing went out: the next stream is the only one c hears of.
        at_a, at_c = await connect(net)
        assert list(net.ends["c"].streams) == [("a", at_a.stream_id)]
        assert net.nothing_accepted("c")


# -- 3. OPENs refused or bounced on the way --------------------------------------------


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        ("not a remote of c", "site c gets no keys with a (not a [[remote]] there)"),
        ("no acceptor at c", "site c gets no keys with a (not a [[remote]] there)"),
        ("b's hop to c down", "the session from b to c is down"),
        ("b's send to c refused", "the session from b to c is down"),
    ],
)
async def test_an_open_the_far_side_cannot_take_is_answered_by_a_close(
    refusal: str, reason: str
) -> None:
    accepts = {**EVERYONE, "c": {"b"}} if refusal == "not a remote of c" else EVERYONE
    async with line(accepts) as net:
        if refusal == "no acceptor at c":
            net.ends["c"].accept = None
        elif refusal == "b's hop to c down":
            net.up["b"].discard("c")
        elif refusal == "b's send to c refused":
            net.broken.add(("b", "c"))
        at_a = await net.ends["a"].open("c")  # the OPEN left a: the answer comes back
        assert await ended(at_a) == reason
        assert net.ends["a"].streams == {}
        assert net.ends["c"].streams == {}
        assert net.nothing_accepted("c")
        with pytest.raises(RoutedStreamClosed, match=re.escape(reason)):
            await at_a.send_all(b"hello")


# -- 4. the limit of streams per site ----------------------------------------------------


async def test_at_the_limit_a_new_open_evicts_the_oldest_waiting_stream_or_is_refused() -> None:
    async with line() as net:
        pairs = [await connect(net) for _ in range(MAX_STREAMS_PER_SITE)]

        # None authenticated: the oldest makes room, and its opener hears so.
        newest = await connect(net)
        evicted_a, evicted_c = pairs.pop(0)
        pairs.append(newest)
        assert evicted_c.end_reason == EVICTED
        assert await ended(evicted_a) == EVICTED
        assert ("a", evicted_a.stream_id) not in net.ends["a"].streams
        assert await evicted_c.receive_some() == b""
        assert all(a.end_reason is None and c.end_reason is None for a, c in pairs)
        assert len(net.ends["c"].streams) == MAX_STREAMS_PER_SITE

        # The oldest still in its handshake goes, not an authenticated older one.
        pairs[0][1].authenticated = True
        newest = await connect(net)
        evicted_a, evicted_c = pairs.pop(1)
        pairs.append(newest)
        assert await ended(evicted_a) == EVICTED
        assert evicted_c.end_reason == EVICTED
        assert all(a.end_reason is None and c.end_reason is None for a, c in pairs)

        # All authenticated: one more is refused, and none of them ends.
        for _, at_c in pairs:
            at_c.authenticated = True
        refused = await net.ends["a"].open("c")
        assert await ended(refused) == f"a has {MAX_STREAMS_PER_SITE} routed streams open at c"
        assert net.nothing_accepted("c")
        assert sorted(net.ends["c"].streams) == sorted(("a", a.stream_id) for a, _ in pairs)
        assert all(a.end_reason is None and c.end_reason is None for a, c in pairs)
        await pairs[0][0].send_all(b"still open")
        assert await pairs[0][1].receive_some() == b"still open"

        # The limit is per site: b still opens streams at c.
        from_b, at_c = await connect(net, "b", "c")
        assert at_c.remote == "b" and from_b.end_reason is None


# -- 5. envelopes only from the far end ------------------------------------------------


@pytest.mark.parametrize("kind", [RoutedKind.DATA, RoutedKind.CLOSE])
async def test_an_envelope_not_from_the_streams_far_end_is_ignored(kind: RoutedKind) -> None:
    async with line() as net:
        at_a, at_c = await connect(net)
        # b names a's stream with c (a opened it: opener a, the destination).
        forged = RoutedEnvelope("b", "a", MAX_HOPS, kind, at_a.stream_id, False, b"forged")
        net.inject("a", forged)
        await at_c.send_all(b"genuine")  # reaches a after the forged envelope
        assert await at_a.receive_some() == b"genuine"
        assert at_a.end_reason is None
        assert ("a", at_a.stream_id) in net.ends["a"].streams
        await at_a.send_all(b"reply")
        assert await at_c.receive_some() == b"reply"


# -- 6. a reader that falls behind -------------------------------------------------------


async def test_a_reader_that_falls_behind_ends_its_stream_and_a_close_goes_back() -> None:
    async with line() as net:
        at_a, at_c = await connect(net)
        for _ in range(STREAM_QUEUE + 1):  # one DATA envelope each; c reads none
            await at_a.send_all(b"x")
        assert await ended(at_a) == "the stream's reader at c fell behind"
        assert at_c.end_reason == "this end's reader fell behind"
        assert net.ends["a"].streams == {} and net.ends["c"].streams == {}
        # c's reader still gets what was queued, no more, then the end.
        assert b"".join(await receive_exactly(at_c, STREAM_QUEUE)) == b"x" * STREAM_QUEUE
        assert await at_c.receive_some() == b""


# -- 7. a changed route ----------------------------------------------------------------


async def test_end_rerouted_ends_exactly_the_streams_whose_route_changed() -> None:
    async with line() as net:
        to_b, at_b = await connect(net, "a", "b")
        to_c, _ = await connect(net, "a", "c")
        _, from_c = await connect(net, "c", "a")
        asked: list[str] = []

        def rerouted(remote: str) -> bool:
            asked.append(remote)
            return remote == "c"

        net.ends["a"].end_rerouted(rerouted)
        assert sorted(asked) == ["b", "c", "c"]
        for stream in (to_c, from_c):
            assert await ended(stream) == "the route to c changed"
            with pytest.raises(RoutedStreamClosed):
                await stream.send_all(b"hello")
        assert to_b.end_reason is None
        await to_b.send_all(b"still routed")
        assert await at_b.receive_some() == b"still routed"
