"""ROUTED envelopes (qkdd.relay.routed): the byte format and every refusal of its decoder,
the forwarding decision of one site (deliver, forward one hop fewer, bounce a CLOSE back
to the source, drop a CLOSE that cannot go on), envelopes carried along simulated chains
and rings of sites and stopped by the hop limit in a routing loop, and the split of a
stream's bytes into DATA payloads. Whatever bytes arrive, decoding raises nothing but
RoutedFrameError, and what it accepts encodes back to the same bytes."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdd.peer.peer_errors import RemoteProtocolError
from qkdd.relay.hop_seal import MAX_PATH_SITES
from qkdd.relay.relay_routes import Graph, RouteTable, compute_routes
from qkdd.relay.routed import (
    MAX_HOPS,
    MAX_REASON_BYTES,
    MAX_ROUTED_DATA,
    ROUTED_FORMAT_VERSION,
    STREAM_ID_SIZE,
    Bounce,
    Deliver,
    Forward,
    RouteAction,
    RoutedEnvelope,
    RoutedFrameError,
    RoutedKind,
    decode_routed,
    route_envelope,
    split_data,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STREAM = bytes(range(0xA0, 0xA0 + STREAM_ID_SIZE))


def envelope(
    kind: RoutedKind = RoutedKind.DATA,
    source: str = "a",
    destination: str = "d",
    *,
    hops_left: int = MAX_HOPS,
    opener_is_source: bool = True,
    payload: bytes = b"",
) -> RoutedEnvelope:
    return RoutedEnvelope(source, destination, hops_left, kind, STREAM, opener_is_source, payload)


def body_with(**changes: object) -> bytes:
    """A ROUTED body encoded field by field, bypassing the checks ``encode`` makes."""
    f: dict = {
        "version": ROUTED_FORMAT_VERSION,
        "hops_left": MAX_HOPS,
        "source": b"a",
        "destination": b"d",
        "kind": RoutedKind.DATA,
        "opener": 1,
        "stream_id": STREAM,
        "payload": b"",
    } | changes
    return (
        bytes([f["version"], f["hops_left"], len(f["source"])])
        + f["source"]
        + bytes([len(f["destination"])])
        + f["destination"]
        + bytes([f["kind"], f["opener"]])
        + f["stream_id"]
        + f["payload"]
    )


# -- the byte format ---------------------------------------------------------------------


def test_the_layout_is_version_hops_sites_kind_opener_stream_payload() -> None:
    env = envelope(RoutedKind.DATA, "site-a", "b", hops_left=7, payload=b"xyz")
    expected = bytes([1, 7, 6]) + b"site-a" + bytes([1]) + b"b" + bytes([2, 1]) + STREAM + b"xyz"
    assert env.encode() == expected
    assert decode_routed(expected) == env


ROUND_TRIPS = {
    "OPEN": envelope(RoutedKind.OPEN),
    "DATA from the opener": envelope(RoutedKind.DATA, payload=b"\x00\xff session bytes"),
    "DATA to the opener": envelope(RoutedKind.DATA, "d", "a", opener_is_source=False),
    "empty DATA": envelope(RoutedKind.DATA),
    "largest DATA": envelope(RoutedKind.DATA, payload=bytes(MAX_ROUTED_DATA)),
    "CLOSE from the opener": envelope(RoutedKind.CLOSE, payload="done ✓".encode()),
    "CLOSE to the opener": envelope(RoutedKind.CLOSE, "d", "a", opener_is_source=False),
    "longest CLOSE": envelope(RoutedKind.CLOSE, payload=b"r" * MAX_REASON_BYTES),
    "no hops left": envelope(RoutedKind.DATA, hops_left=0),
    "longest site IDs": envelope(RoutedKind.OPEN, "s" * 64, "A0._:-" + "z" * 58),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_every_kind_round_trips(case: str) -> None:
    env = ROUND_TRIPS[case]
    body = env.encode()
    decoded = decode_routed(body)
    assert decoded == env
    assert decoded.encode() == body


BAD_BODIES = {
    "empty": (b"", "truncated in header"),
    "format 0": (body_with(version=0), "ROUTED format 0, this site reads 1"),
    "format 2": (body_with(version=2), "ROUTED format 2, this site reads 1"),
    "too many hops left": (body_with(hops_left=MAX_HOPS + 1), f"{MAX_HOPS + 1} hops left"),
    "255 hops left": (body_with(hops_left=255), "255 hops left"),
    "empty source": (body_with(source=b""), "source is not a site ID"),
    "empty destination": (body_with(destination=b""), "destination is not a site ID"),
    "malformed source": (body_with(source=b"-a"), "source is not a site ID"),
    "malformed destination": (body_with(destination=b"d d"), "destination is not a site ID"),
    "site ID too long": (body_with(source=b"s" * 65), "source is not a site ID"),
    "non-ASCII source": (body_with(source="é".encode()), "source is not a site ID"),
    "non-ASCII destination": (body_with(destination=b"d\xff"), "destination is not a site ID"),
    "site ID beyond the body": (bytes([1, 3, 5]) + b"ab", "truncated in source"),
    "no destination": (bytes([1, 3, 1]) + b"a", "truncated in destination"),
    "to itself": (body_with(destination=b"a"), "from a site to itself"),
    "no kind": (body_with()[: 2 + 2 + 2], "truncated in kind"),
    "kind 0": (body_with(kind=0), "unknown kind 0"),
    "kind 4": (body_with(kind=4), "unknown kind 4"),
    "opener flag 2": (body_with(opener=2), "opener flag 2, not 0 or 1"),
    "opener flag 255": (body_with(opener=255), "opener flag 255, not 0 or 1"),
    "truncated stream ID": (body_with(stream_id=STREAM[:-1]), "truncated in stream ID"),
    "no stream ID": (body_with(stream_id=b""), "truncated in stream ID"),
    "DATA too long": (
        body_with(payload=bytes(MAX_ROUTED_DATA + 1)),
        f"DATA carries {MAX_ROUTED_DATA + 1} bytes",
    ),
    "CLOSE reason too long": (
        body_with(kind=RoutedKind.CLOSE, payload=b"r" * (MAX_REASON_BYTES + 1)),
        f"CLOSE carries {MAX_REASON_BYTES + 1} bytes",
    ),
    "OPEN with a payload": (
        body_with(kind=RoutedKind.OPEN, payload=b"x"),
        "OPEN comes from the opener and carries nothing",
    ),
    "OPEN not from its opener": (
        body_with(kind=RoutedKind.OPEN, opener=0),
        "OPEN comes from the opener and carries nothing",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_malformed_bodies_are_refused_with_a_reason(case: str) -> None:
    body, reason = BAD_BODIES[case]
    with pytest.raises(RoutedFrameError, match=reason):
        decode_routed(body)


def test_a_malformed_body_is_a_protocol_error_of_the_session() -> None:
    assert issubclass(RoutedFrameError, RemoteProtocolError)


def test_the_bounds_themselves_are_accepted() -> None:
    # The refusals above are one past these: the limits are inclusive.
    assert decode_routed(body_with(hops_left=MAX_HOPS)).hops_left == MAX_HOPS
    assert decode_routed(body_with(source=b"s" * 64)).source == "s" * 64
    assert len(decode_routed(body_with(payload=bytes(MAX_ROUTED_DATA))).payload) == (
        MAX_ROUTED_DATA
    )
    close = body_with(kind=RoutedKind.CLOSE, payload=b"r" * MAX_REASON_BYTES)
    assert decode_routed(close).kind is RoutedKind.CLOSE


def test_opener_is_the_source_or_the_destination_by_its_flag() -> None:
    assert envelope(opener_is_source=True).opener == "a"
    assert envelope(opener_is_source=False).opener == "d"


@pytest.mark.parametrize("opener_is_source", [True, False])
def test_a_reply_swaps_the_ends_of_the_same_stream(opener_is_source: bool) -> None:
    env = envelope(RoutedKind.DATA, hops_left=3, opener_is_source=opener_is_source)
    back = env.reply(RoutedKind.CLOSE, b"why")
    assert (back.source, back.destination) == ("d", "a")
    assert back.stream_id == env.stream_id
    assert back.opener_is_source is not opener_is_source
    assert back.opener == env.opener  # the same stream, seen from its other end
    assert (back.kind, back.payload, back.hops_left) == (RoutedKind.CLOSE, b"why", MAX_HOPS)
    assert back.reply(RoutedKind.DATA) == replace(env, hops_left=MAX_HOPS)


def test_payloads_stay_out_of_reprs() -> None:
    secret = b"\x13\x37 end-to-end frame \xfe"
    env = envelope(RoutedKind.DATA, payload=secret)
    text = repr((env, Forward("b", env.encode())))
    assert secret.hex() not in text and repr(secret) not in text and "end-to-end" not in text


# -- the forwarding decision -------------------------------------------------------------


def graph_of(edges: list[tuple[str, str]]) -> Graph:
    graph: dict[str, dict[str, int]] = {}
    for x, y in edges:
        graph.setdefault(x, {})[y] = 1
        graph.setdefault(y, {})[x] = 1
    return graph


def line(sites: list[str]) -> Graph:
    return graph_of(list(itertools.pairwise(sites)))


def ring(sites: list[str]) -> Graph:
    return graph_of([*itertools.pairwise(sites), (sites[-1], sites[0])])


LINE = line(["a", "b", "c", "d"])
RING = ring(["r0", "r1", "r2", "r3", "r4", "r5"])


def tables(graph: Graph) -> dict[str, RouteTable]:
    return {site: compute_routes(graph, site) for site in graph}


def all_up(graph: Graph) -> dict[str, frozenset[str]]:
    return {site: frozenset(graph[site]) for site in graph}


def test_an_envelope_for_this_site_is_delivered() -> None:
    env = envelope(RoutedKind.DATA, payload=b"hello")
    assert route_envelope(env, "d", tables(LINE)["d"], frozenset({"c"})) == Deliver(env)
    # Even with no hops left and no session up: it has arrived.
    spent = replace(env, hops_left=0)
    assert route_envelope(spent, "d", tables(LINE)["d"], frozenset()) == Deliver(spent)


@pytest.mark.parametrize("kind", list(RoutedKind))
@pytest.mark.parametrize(("site", "next_hop"), [("a", "b"), ("b", "c"), ("c", "d")])
def test_an_envelope_goes_on_one_hop_fewer_and_otherwise_unchanged(
    kind: RoutedKind, site: str, next_hop: str
) -> None:
    payload = b"" if kind is RoutedKind.OPEN else b"payload"
    env = envelope(kind, hops_left=5, payload=payload)
    action = route_envelope(env, site, tables(LINE)[site], frozenset(LINE[site]))
    assert isinstance(action, Forward)
    assert action.peer == next_hop
    assert decode_routed(action.body) == replace(env, hops_left=4)


def test_the_last_hop_may_be_taken_with_one_hop_left() -> None:
    action = route_envelope(envelope(hops_left=1), "c", tables(LINE)["c"], frozenset({"b", "d"}))
    assert isinstance(action, Forward) and decode_routed(action.body).hops_left == 0


DISCONNECTED = graph_of([("a", "b"), ("c", "d")])

CANNOT_GO_ON = {
    # site, its graph, the sessions up there, hops left -> the reason
    "no route": ("b", DISCONNECTED, {"a"}, MAX_HOPS, "site b has no route to d"),
    "next hop down": ("b", LINE, {"a"}, MAX_HOPS, "the session from b to c is down"),
    "no session up": ("c", LINE, set(), MAX_HOPS, "the session from c to d is down"),
    "hop limit": ("b", LINE, {"a", "c"}, 0, "hop limit reached at b"),
}


@pytest.mark.parametrize("kind", [RoutedKind.OPEN, RoutedKind.DATA])
@pytest.mark.parametrize("case", sorted(CANNOT_GO_ON))
def test_what_cannot_go_on_bounces_a_close_to_its_source(kind: RoutedKind, case: str) -> None:
    site, graph, up, hops_left, reason = CANNOT_GO_ON[case]
    env = envelope(kind, hops_left=hops_left)
    action = route_envelope(env, site, compute_routes(graph, site), frozenset(up))
    assert action == Bounce(env.reply(RoutedKind.CLOSE, reason.encode()), reason)
    assert isinstance(action, Bounce) and action.envelope is not None
    back = action.envelope
    assert (back.source, back.destination, back.kind) == ("d", "a", RoutedKind.CLOSE)
    assert (back.opener, back.stream_id) == ("a", STREAM)
    assert back.payload.decode() == reason
    assert decode_routed(back.encode()) == back


@pytest.mark.parametrize("case", sorted(CANNOT_GO_ON))
def test_a_close_that_cannot_go_on_is_dropped(case: str) -> None:
    site, graph, up, hops_left, reason = CANNOT_GO_ON[case]
    env = envelope(RoutedKind.CLOSE, hops_left=hops_left, payload=b"bye")
    action = route_envelope(env, site, compute_routes(graph, site), frozenset(up))
    assert action == Bounce(None, reason)


def test_a_bounce_between_the_longest_site_ids_still_decodes() -> None:
    source, relay, hop, destination = "s" * 64, "r" * 64, "h" * 64, "d" * 64
    routes = compute_routes(line([source, relay, hop, destination]), relay)
    action = route_envelope(
        envelope(RoutedKind.DATA, source, destination), relay, routes, frozenset()
    )
    assert isinstance(action, Bounce) and action.envelope is not None
    assert action.reason == f"the session from {relay} to {hop} is down"
    assert decode_routed(action.envelope.encode()) == action.envelope


# -- envelopes carried over simulated sites ----------------------------------------------


def carry(
    env: RoutedEnvelope,
    at: str,
    routes: dict[str, RouteTable],
    up: dict[str, frozenset[str]],
) -> tuple[list[str], RouteAction]:
    """Apply each site's ``route_envelope`` from ``at`` on, passing on the decoded bodies of
    its forwards: the sites that forwarded it, in order, and the action that ended it."""
    forwarded_by: list[str] = []
    for _ in range(4 * MAX_HOPS):  # more than any hop limit allows: only catches a runaway
        action = route_envelope(env, at, routes[at], up[at])
        if not isinstance(action, Forward):
            return forwarded_by, action
        forwarded_by.append(at)
        env, at = decode_routed(action.body), action.peer
    raise AssertionError(f"still forwarding after {len(forwarded_by)} hops")


@pytest.mark.parametrize("graph", [LINE, RING], ids=["line", "ring"])
def test_an_envelope_follows_its_path_to_the_destination(graph: Graph) -> None:
    routes = tables(graph)
    for source, destination in itertools.permutations(sorted(graph), 2):
        path = routes[source].path(destination)
        assert path is not None
        env = envelope(RoutedKind.DATA, source, destination, payload=b"bytes")
        forwarded_by, action = carry(env, source, routes, all_up(graph))
        assert forwarded_by == list(path[:-1])
        assert len(forwarded_by) == len(path) - 1
        assert action == Deliver(replace(env, hops_left=MAX_HOPS - (len(path) - 1)))


def test_the_longest_path_is_within_the_hop_limit_and_one_more_site_is_not() -> None:
    sites = [f"s{i:02d}" for i in range(MAX_PATH_SITES + 1)]
    longest = line(sites[:MAX_PATH_SITES])
    env = envelope(RoutedKind.DATA, sites[0], sites[MAX_PATH_SITES - 1])
    forwarded_by, action = carry(env, sites[0], tables(longest), all_up(longest))
    assert len(forwarded_by) == MAX_HOPS
    assert action == Deliver(replace(env, hops_left=0))

    too_long = line(sites)
    routes, up = tables(too_long), all_up(too_long)
    env = envelope(RoutedKind.DATA, sites[0], sites[-1])
    forwarded_by, action = carry(env, sites[0], routes, up)
    assert len(forwarded_by) == MAX_HOPS
    stuck = sites[MAX_HOPS]
    assert action == Bounce(
        replace(env, hops_left=0).reply(RoutedKind.CLOSE, f"hop limit reached at {stuck}".encode()),
        f"hop limit reached at {stuck}",
    )
    # The CLOSE it bounces finds its way back to the source.
    assert action.envelope is not None
    _, back = carry(action.envelope, stuck, routes, up)
    assert isinstance(back, Deliver) and back.envelope.destination == sites[0]
    assert back.envelope.opener == sites[0] and back.envelope.kind is RoutedKind.CLOSE


def test_a_routing_loop_is_stopped_by_the_hop_limit() -> None:
    # b and c each send d's envelopes to the other: neither ever reaches d.
    routes = tables(LINE)
    routes["b"] = RouteTable("b", {"b": ("b",), "d": ("b", "c", "d"), "a": ("b", "a")})
    routes["c"] = RouteTable("c", {"c": ("c",), "d": ("c", "b", "d"), "a": ("c", "b", "a")})
    up = all_up(LINE)
    env = envelope(RoutedKind.DATA, "a", "d", payload=b"looping")
    forwarded_by, action = carry(env, "a", routes, up)
    assert forwarded_by == ["a", *itertools.islice(itertools.cycle("bc"), MAX_HOPS - 1)]
    assert isinstance(action, Bounce) and action.reason.startswith("hop limit reached at ")
    # The bounced CLOSE goes back to a, which opened the stream.
    assert action.envelope is not None
    stuck = action.reason.removeprefix("hop limit reached at ")
    _, back = carry(action.envelope, stuck, routes, up)
    assert isinstance(back, Deliver)
    assert (back.envelope.destination, back.envelope.kind) == ("a", RoutedKind.CLOSE)
    assert (back.envelope.opener, back.envelope.stream_id) == ("a", STREAM)
    # A CLOSE caught in the loop is dropped once its hops are spent.
    _, action = carry(envelope(RoutedKind.CLOSE, "a", "d"), "a", routes, up)
    assert isinstance(action, Bounce) and action.envelope is None


# -- splitting a stream's bytes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "pieces"),
    [
        (0, []),
        (1, [1]),
        (MAX_ROUTED_DATA - 1, [MAX_ROUTED_DATA - 1]),
        (MAX_ROUTED_DATA, [MAX_ROUTED_DATA]),
        (MAX_ROUTED_DATA + 1, [MAX_ROUTED_DATA, 1]),
        (3 * MAX_ROUTED_DATA - 5, [MAX_ROUTED_DATA, MAX_ROUTED_DATA, MAX_ROUTED_DATA - 5]),
    ],
)
def test_split_data_cuts_at_the_data_limit(size: int, pieces: list[int]) -> None:
    data = bytes(i % 251 for i in range(size))
    split = split_data(data)
    assert [len(piece) for piece in split] == pieces
    assert b"".join(split) == data
    for piece in split:
        decode_routed(envelope(RoutedKind.DATA, payload=piece).encode())


# -- arbitrary input ---------------------------------------------------------------------

site_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)


@st.composite
def envelopes(draw: st.DrawFn) -> RoutedEnvelope:
    source = draw(site_ids)
    kind = draw(st.sampled_from(list(RoutedKind)))
    limit = {RoutedKind.OPEN: 0, RoutedKind.DATA: 2000, RoutedKind.CLOSE: MAX_REASON_BYTES}
    return RoutedEnvelope(
        source,
        draw(site_ids.filter(lambda site: site != source)),
        draw(st.integers(0, MAX_HOPS)),
        kind,
        draw(st.binary(min_size=STREAM_ID_SIZE, max_size=STREAM_ID_SIZE)),
        kind is RoutedKind.OPEN or draw(st.booleans()),
        draw(st.binary(max_size=limit[kind])),
    )


@SETTINGS
@given(envelopes())
def test_every_valid_envelope_round_trips(env: RoutedEnvelope) -> None:
    assert decode_routed(env.encode()) == env


def mutated(body: bytes) -> st.SearchStrategy[bytes]:
    edits = st.lists(st.tuples(st.integers(0, len(body) - 1), st.integers(0, 255)), max_size=6)
    return edits.map(lambda changes: _apply(body, changes)) | st.integers(0, len(body)).map(
        lambda n: body[:n]
    )


def _apply(body: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(body)
    for at, value in edits:
        out[at] = value
    return bytes(out)


GENUINE = [
    envelope(RoutedKind.OPEN).encode(),
    envelope(RoutedKind.DATA, payload=b"\x00" * 40).encode(),
    envelope(RoutedKind.CLOSE, "site-d", "site-a", opener_is_source=False).encode(),
]


@SETTINGS
@given(st.binary(max_size=400) | st.one_of(*(mutated(body) for body in GENUINE)))
def test_decoding_raises_only_its_own_error_and_round_trips(body: bytes) -> None:
    env = None
    with contextlib.suppress(RoutedFrameError):
        env = decode_routed(body)
    if env is not None:
        assert env.encode() == body
