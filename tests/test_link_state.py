"""The link-state database (qkdd.relay.link_state): the LINK_STATE byte format and its
decoder's errors, the flooding rules, refresh, expiry and a restart's sequence numbers, on
one database and on a simulated network of them (docs/protocol.md §11)."""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from link_state_network import LinkStateNetwork, neighbour_sets

from qkdd.constants import LINK_STATE_LIFETIME, LINK_STATE_REFRESH
from qkdd.relay.link_state import (
    MAX_LINKS,
    MAX_ORIGINS,
    LinkStateAdvertisement,
    LinkStateDatabase,
    LinkStateError,
    Outgoing,
    decode_advertisement,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

site_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)


@st.composite
def advertisements(draw: st.DrawFn) -> LinkStateAdvertisement:
    origin = draw(site_ids)
    neighbours = draw(st.sets(site_ids.filter(lambda n: n != origin), max_size=8))
    costs = draw(st.lists(st.integers(1, 0xFFFF), min_size=len(neighbours), max_size=8))
    return LinkStateAdvertisement(
        origin,
        draw(st.integers(1, 2**64 - 1)),
        draw(st.integers(1, 0xFFFF)),
        tuple(zip(sorted(neighbours), costs, strict=False)),
    )


# -- the byte format ---------------------------------------------------------------------------


def test_the_documented_example_encodes_byte_for_byte() -> None:
    # docs/protocol.md §11 gives these bytes.
    ad = LinkStateAdvertisement("A", 2, 1800, (("B", 1), ("C", 3)))
    expected = bytes.fromhex("01 0141 0000000000000002 0708 0002 0142 0001 0143 0003")
    assert ad.encode() == expected
    assert decode_advertisement(expected) == ad


@SETTINGS
@given(advertisements())
def test_encoding_round_trips(ad: LinkStateAdvertisement) -> None:
    assert decode_advertisement(ad.encode()) == ad


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "truncated"),
        (bytes.fromhex("02 0141 0000000000000001 0001 0000"), "format 2"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0000 00"), "followed by 1 bytes"),
        (bytes.fromhex("01 0141 0000000000000001 0001"), "truncated in header"),
        (bytes.fromhex("01 0141 0000000000000000 0001 0000"), "sequence number 0"),
        (bytes.fromhex("01 0141 0000000000000001 0000 0000"), "lifetime 0"),
        (bytes.fromhex("01 00 0000000000000001 0001 0000"), "origin is not a site ID"),
        (bytes.fromhex("01 012e 0000000000000001 0001 0000"), "origin is not a site ID"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0001 0141 0001"), "not a peer's ID"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0001 0142 0000"), "cost 0"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0002 0143 0001 0142 0001"), "ascending"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0002 0142 0001 0142 0001"), "ascending"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0001 0142"), "truncated in cost"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0001 05"), "truncated in neighbour"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0401"), f"most {MAX_LINKS}"),
        (bytes.fromhex("01 0141 0000000000000001 0001 0001 01ff 0001"), "not a site ID"),
    ],
)
def test_malformed_advertisements_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(LinkStateError, match=reason):
        decode_advertisement(body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_random_bytes_raises_only_its_error(body: bytes) -> None:
    with contextlib.suppress(LinkStateError):
        decode_advertisement(body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(advertisements(), st.data())
def test_decoding_mutated_advertisements_raises_only_its_error(
    ad: LinkStateAdvertisement, data: st.DataObject
) -> None:
    body = bytearray(ad.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        edit = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(body)))
        if edit == "flip" and at < len(body):
            body[at] ^= data.draw(st.integers(1, 255))
        elif edit == "cut":
            del body[at : at + data.draw(st.integers(1, 8))]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(LinkStateError):
        decode_advertisement(bytes(body))


# -- one database's rules --------------------------------------------------------------------


def advertisement(origin: str, sequence: int, *links: str, lifetime: int = 100) -> bytes:
    return LinkStateAdvertisement(origin, sequence, lifetime, tuple((n, 1) for n in links)).encode()


def star(now: float = 0.0) -> LinkStateDatabase:
    """Site A with sessions up to B and C (its own advertisement of them made)."""
    database = LinkStateDatabase("A", now, min_interval=0.0)
    database.link_up("B", now)
    database.link_up("C", now)
    return database


def test_a_newer_advertisement_is_flooded_on_to_every_other_up_neighbour() -> None:
    database = star()
    database.link_up("D", 0.0)
    body = advertisement("X", 5, "B")
    assert database.receive("B", body, 1.0) == [Outgoing("C", body), Outgoing("D", body)]
    assert database.advertisements()["X"].sequence == 5
    newer = advertisement("X", 6, "B")
    assert database.receive("C", newer, 2.0) == [Outgoing("B", newer), Outgoing("D", newer)]


def test_the_same_advertisement_again_is_ignored() -> None:
    database = star()
    body = advertisement("X", 5, "B")
    database.receive("B", body, 1.0)
    generation = database.generation
    assert database.receive("C", body, 1.0) == []
    # Counted down elsewhere, it is still the same instance.
    assert database.receive("C", advertisement("X", 5, "B", lifetime=40), 1.0) == []
    assert database.generation == generation


def test_an_older_advertisement_gets_the_newer_copy_sent_back() -> None:
    database = star()
    database.receive("B", advertisement("X", 5, "B"), 1.0)
    # C is behind: it gets the copy held here, counted down by the 3 s it was held.
    assert database.receive("C", advertisement("X", 4, "C"), 4.0) == [
        Outgoing("C", advertisement("X", 5, "B", lifetime=97))
    ]
    assert database.advertisements()["X"].sequence == 5


def test_equal_numbers_with_other_links_pick_the_same_copy_everywhere() -> None:
    low, high = advertisement("X", 5, "B"), advertisement("X", 5, "C")
    first, second = star(), star()
    first.receive("B", low, 1.0)
    first.receive("B", high, 1.0)
    second.receive("B", high, 1.0)
    assert second.receive("B", low, 1.0) == [Outgoing("B", high)]  # low is the older
    assert first.advertisements()["X"] == second.advertisements()["X"]


def test_link_up_sends_the_new_neighbour_every_advertisement_held() -> None:
    database = LinkStateDatabase("A", 0.0, min_interval=0.0)
    database.link_up("B", 0.0)
    database.receive("B", advertisement("B", 3, "A"), 0.0)
    database.receive("B", advertisement("X", 7, "B"), 0.0)
    sent = database.link_up("C", 2.0)
    to_c = {decode_advertisement(m.data).origin: m for m in sent if m.neighbour == "C"}
    assert sorted(to_c) == ["A", "B", "X"]
    assert decode_advertisement(to_c["X"].data).lifetime == 98
    assert database.own.links == (("B", 1), ("C", 1))
    assert [m.neighbour for m in sent if decode_advertisement(m.data).origin == "A"] == ["B", "C"]


def test_own_links_are_advertised_at_once_then_no_more_often_than_the_minimum_interval() -> None:
    database = LinkStateDatabase("A", 0.0, min_interval=1.0, refresh=600.0)
    first = database.own.sequence
    assert database.next_deadline() == 600.0
    sent = database.link_up("B", 0.25)  # within 1 s of the first: held back
    assert database.own.sequence == first
    assert [decode_advertisement(m.data).links for m in sent] == [()]
    assert database.next_deadline() == 1.0
    assert database.link_up("C", 0.5) != []  # the sync to C; still nothing new of ours
    assert database.on_deadline(1.0) == [
        Outgoing("B", database.own.encode()),
        Outgoing("C", database.own.encode()),
    ]
    assert database.own.sequence == first + 1  # both links in one advertisement
    assert database.own.links == (("B", 1), ("C", 1))
    assert database.next_deadline() == 601.0
    assert database.link_down("C", 5.0) == [Outgoing("B", database.own.encode())]
    assert database.own.links == (("B", 1),)


def test_own_advertisement_is_refreshed_with_a_new_number() -> None:
    database = star()
    before = database.own
    assert database.on_deadline(LINK_STATE_REFRESH - 1) == []
    sent = database.on_deadline(LINK_STATE_REFRESH)
    assert database.own.sequence == before.sequence + 1
    assert database.own.links == before.links
    assert database.own.lifetime == LINK_STATE_LIFETIME
    assert {m.neighbour for m in sent} == {"B", "C"}


def test_an_advertisement_not_refreshed_expires() -> None:
    database = star()
    database.receive("B", advertisement("X", 5, "B", lifetime=30), 10.0)
    assert database.next_deadline() == 40.0
    generation = database.generation
    assert database.on_deadline(39.9) == []
    assert "X" in database.advertisements()
    database.on_deadline(40.0)
    assert "X" not in database.advertisements()
    assert database.generation > generation


def test_a_stale_copy_of_its_own_advertisement_is_corrected() -> None:
    database = star()
    own = database.own
    assert database.receive("B", advertisement("A", own.sequence - 1 or 1, "Z"), 1.0) == [
        Outgoing("B", replace(own, lifetime=LINK_STATE_LIFETIME - 1).encode())
    ]
    assert database.own == own


def test_its_own_advertisement_from_before_a_restart_is_jumped_past() -> None:
    database = LinkStateDatabase("A", 0.0, min_interval=1.0)
    database.link_up("B", 0.0)
    assert database.own.sequence == 1
    sent = database.receive("B", advertisement("A", 41, "B", "C"), 0.5)  # held back
    assert sent == []
    sent = database.on_deadline(1.0)
    assert database.own.sequence == 42
    assert database.own.links == (("B", 1),)
    assert sent == [Outgoing("B", database.own.encode())]


def test_links_count_only_when_both_ends_advertise_them() -> None:
    database = star()
    database.receive("B", advertisement("B", 1, "A", "X"), 0.0)
    assert database.graph() == {"A": {"B": 1}, "B": {"A": 1}}
    database.receive("B", advertisement("X", 1, "B"), 0.0)
    assert neighbour_sets(database.graph()) == {"A": {"B"}, "B": {"A", "X"}, "X": {"B"}}


def test_a_link_weighs_the_larger_of_its_two_costs() -> None:
    database = LinkStateDatabase("A", 0.0, min_interval=0.0)
    database.link_up("B", 0.0, cost=3)
    cheap = LinkStateAdvertisement("B", 1, 100, (("A", 1),))
    database.receive("B", cheap.encode(), 0.0)
    assert database.graph() == {"A": {"B": 3}, "B": {"A": 3}}


def test_bad_local_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        LinkStateDatabase("not an id", 0.0)
    database = LinkStateDatabase("A", 0.0)
    with pytest.raises(ValueError):
        database.link_up("A", 0.0)
    with pytest.raises(ValueError):
        database.link_up("B", 0.0, cost=0)


# -- a network of them ---------------------------------------------------------------------------


@st.composite
def topologies(draw: st.DrawFn) -> tuple[list[str], list[tuple[str, str]]]:
    """2 to 6 sites, connected: a random tree plus some other links."""
    sites = draw(st.lists(site_ids, min_size=2, max_size=6, unique=True))
    edges = {
        frozenset((site, draw(st.sampled_from(sites[:i])))) for i, site in enumerate(sites) if i
    }
    pairs = [frozenset((a, b)) for a in sites for b in sites if a < b]
    edges |= set(draw(st.lists(st.sampled_from(pairs), max_size=4)))
    return sites, sorted(tuple(sorted(edge)) for edge in edges)  # type: ignore[misc]


def build(
    sites: list[str], edges: list[tuple[str, str]], rng: random.Random, **delivery: object
) -> LinkStateNetwork:
    """Start every site, then bring the sessions up in a random order, delivering some of
    what is in flight between them."""
    network = LinkStateNetwork(rng)
    for site in sites:
        network.start(site)
    for a, b in rng.sample(edges, len(edges)):
        network.now += rng.random()
        network.connect(a, b)
        network.deliver(most=rng.randrange(4), **delivery)  # type: ignore[arg-type]
    return network


def check_matches_sessions(network: LinkStateNetwork) -> None:
    """Every site agrees with every other it is connected to, and sees the sessions up among
    them (a site cut off from others may still hold their advertisements until they expire)."""
    assert network.converged(), network.views()
    true = network.true_graph()
    for site, database in network.sites.items():
        component = network.component(site)
        seen = neighbour_sets(database.graph())
        assert {s: seen.get(s, set()) for s in component} == {
            s: true.get(s, set()) for s in component
        }


@SETTINGS
@given(topologies(), st.integers(0, 2**32))
def test_flooding_with_duplicates_and_any_order_converges(
    topology: tuple[list[str], list[tuple[str, str]]], seed: int
) -> None:
    rng = random.Random(seed)
    network = build(*topology, rng, reorder=True, duplicate=0.3)
    # Sessions fail and come back meanwhile.
    for a, b in rng.sample(topology[1], min(2, len(topology[1]))):
        network.disconnect(a, b)
        network.deliver(most=rng.randrange(4), reorder=True, duplicate=0.3)
        network.now += rng.random()
        network.connect(a, b)
    network.settle(reorder=True, duplicate=0.3)
    check_matches_sessions(network)


@SETTINGS
@given(topologies(), st.integers(0, 2**32))
def test_flooding_with_losses_converges_at_the_next_refresh(
    topology: tuple[list[str], list[tuple[str, str]]], seed: int
) -> None:
    rng = random.Random(seed)
    network = build(*topology, rng, reorder=True, duplicate=0.2, loss=0.3)
    network.settle(reorder=True, duplicate=0.2, loss=0.3)
    # Once nothing is lost, every site's next refresh reaches every other site.
    network.advance(network.now + LINK_STATE_REFRESH + 2, reorder=True)
    check_matches_sessions(network)


def test_flooding_reaches_the_far_end_of_a_line() -> None:
    network = build(
        ["A", "B", "C", "D", "E"],
        [("A", "B"), ("B", "C"), ("C", "D"), ("D", "E")],
        random.Random(1),
    )
    network.settle()
    check_matches_sessions(network)
    network.disconnect("C", "D")
    network.settle()
    check_matches_sessions(network)
    assert neighbour_sets(network.sites["A"].graph()) == {
        "A": {"B"},
        "B": {"A", "C"},
        "C": {"B"},
        "D": {"E"},
        "E": {"D"},
    }


def test_a_dead_sites_advertisement_expires_and_its_links_go() -> None:
    network = build(["A", "B", "C"], [("A", "B"), ("B", "C")], random.Random(2))
    network.settle()
    network.stop("C")
    network.settle()
    # Held until it expires, but B no longer lists C: the link is gone at once.
    assert "C" in network.sites["A"].advertisements()
    assert neighbour_sets(network.sites["A"].graph()) == {"A": {"B"}, "B": {"A"}}
    network.advance(network.now + LINK_STATE_LIFETIME + 1)
    for database in network.sites.values():
        assert "C" not in database.advertisements()
    check_matches_sessions(network)


def test_a_restarted_site_gets_past_its_old_sequence_numbers() -> None:
    ring = ["A", "B", "C", "D", "E"]
    network = build(ring, [(s, ring[(i + 1) % 5]) for i, s in enumerate(ring)], random.Random(3))
    network.settle()
    network.advance(network.now + 3 * LINK_STATE_REFRESH + 1)  # C's number is now above 3
    old = network.sites["C"].own.sequence
    assert old > 3
    network.now += 5
    restarted = network.restart("C")
    assert restarted.own.sequence == 1
    network.settle(reorder=True)
    assert restarted.own.sequence > old
    check_matches_sessions(network)
    assert network.sites["A"].advertisements()["C"] == restarted.own


def test_a_restart_that_reuses_the_number_with_other_links_is_resolved() -> None:
    # The old C reached number 2 with links to B and D; the new one starts at 2 with none.
    network = build(["B", "C", "D"], [("B", "C"), ("C", "D")], random.Random(4))
    network.settle()
    assert network.sites["C"].own.sequence == 2
    network.now += 5
    network.stop("C")
    network.settle()
    restarted = network.start("C", first_sequence=2)
    assert restarted.own.sequence == 2
    network.connect("B", "C")
    network.settle()
    check_matches_sessions(network)
    assert restarted.own.sequence == 3
    assert network.sites["B"].advertisements()["C"] == restarted.own


def test_a_neighbour_cannot_grow_the_database_beyond_its_origin_cap() -> None:
    db = LinkStateDatabase("A", 0.0)
    db.link_up("B", 0.0)
    for index in range(MAX_ORIGINS + 10):
        origin = f"X{index}"
        db.receive("B", LinkStateAdvertisement(origin, 1, 1800, (("B", 1),)).encode(), 1.0)
    held = db.advertisements()
    assert len(held) == MAX_ORIGINS + 1  # its own, and the cap of others
    assert f"X{MAX_ORIGINS}" not in held and f"X{MAX_ORIGINS - 1}" in held
    # An origin it holds is still updated at the cap.
    newer = LinkStateAdvertisement("X0", 2, 1800, (("B", 2),))
    assert db.receive("B", newer.encode(), 2.0) == []  # B is the only neighbour: no flood
    assert db.advertisements()["X0"] == newer
