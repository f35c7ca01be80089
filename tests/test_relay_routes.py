"""Routes between sites (qkdd.relay.relay_routes): shortest paths over the link-state
database's two-way links, ties broken by site ID, static next hops taking precedence while
their neighbour is up (docs/protocol.md §11)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from link_state_network import LinkStateNetwork

from qkdd.relay.relay_routes import RouteTable, compute_routes, shortest_paths

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def network_of(sites: list[str], edges: list[tuple[str, str]]) -> LinkStateNetwork:
    network = LinkStateNetwork(random.Random(0))
    for site in sites:
        network.start(site)
    for a, b in edges:
        network.connect(a, b)
    network.settle()
    assert network.converged()
    return network


def routes(
    network: LinkStateNetwork, site: str, static: dict[str, str] | None = None
) -> RouteTable:
    database = network.sites[site]
    return compute_routes(
        database.graph(),
        site,
        up_neighbours=database.up_neighbours,
        static_next_hops=static,
    )


def line(count: int) -> tuple[list[str], list[tuple[str, str]]]:
    sites = [f"site-{i}" for i in range(count)]
    return sites, list(itertools.pairwise(sites))


def ring(count: int) -> tuple[list[str], list[tuple[str, str]]]:
    sites, edges = line(count)
    return sites, [*edges, (sites[-1], sites[0])]


@pytest.mark.parametrize("count", [3, 4, 5])
def test_a_line_routes_end_to_end(count: int) -> None:
    sites, edges = line(count)
    network = network_of(sites, edges)
    first, last = sites[0], sites[-1]
    assert routes(network, first).path(last) == tuple(sites)
    assert routes(network, last).path(first) == tuple(reversed(sites))
    assert routes(network, first).next_hop(last) == sites[1]
    middle = sites[count // 2]
    assert routes(network, middle).next_hop(first) == sites[count // 2 - 1]
    assert routes(network, first).path(first) == (first,)
    assert routes(network, first).next_hop(first) is None


def test_a_ring_of_five_goes_the_short_way_and_reroutes_round_a_link_down() -> None:
    sites, edges = ring(5)
    a, b, c, d, e = sites
    network = network_of(sites, edges)
    table = routes(network, a)
    assert table.path(c) == (a, b, c)
    assert table.path(d) == (a, e, d)
    assert table.next_hop(d) == e
    network.disconnect(a, b)
    network.settle()
    table = routes(network, a)
    assert table.path(b) == (a, e, d, c, b)
    assert table.path(c) == (a, e, d, c)
    assert routes(network, c).path(a) == (c, d, e, a)


def test_a_site_cut_off_is_unreachable() -> None:
    sites, edges = line(4)
    network = network_of(sites, edges)
    network.disconnect(sites[1], sites[2])
    network.settle()
    table = routes(network, sites[0])
    assert table.path(sites[3]) is None
    assert table.next_hop(sites[3]) is None
    assert table.path("never-heard-of") is None


def test_equal_cost_paths_are_broken_by_site_id() -> None:
    sites, edges = ring(4)
    a, b, c, d = sites
    network = network_of(sites, edges)
    # a -> c: via b or via d, both two hops; b sorts first.
    assert routes(network, a).path(c) == (a, b, c)
    assert routes(network, c).path(a) == (c, b, a)
    assert shortest_paths({"x": {"n": 1, "m": 1}, "m": {"z": 1}, "n": {"z": 1}}, "x")["z"] == (
        "x",
        "m",
        "z",
    )


def test_costs_steer_the_path() -> None:
    sites, edges = ring(4)
    a, b, c, d = sites
    network = LinkStateNetwork(random.Random(0))
    for site in sites:
        network.start(site)
    for x, y in edges:
        network.connect(x, y, cost=5 if {x, y} == {a, b} else 1)
    network.settle()
    assert routes(network, a).path(b) == (a, d, c, b)  # 3 < 5


def test_a_link_only_one_end_advertises_is_not_used() -> None:
    graph = {"a": {"b": 1}, "b": {}, "c": {"b": 1}}
    assert shortest_paths(graph, "a") == {"a": ("a",), "b": ("a", "b")}
    network = network_of(["a", "b"], [])
    network.sites["a"].link_up("b", network.now + 10)  # b has no session with a yet
    network.advance(network.now + 20)
    assert network.sites["a"].up_neighbours == {"b"}
    assert routes(network, "a").path("b") is None


def test_a_static_next_hop_is_preferred_while_its_neighbour_is_up() -> None:
    sites, edges = ring(5)
    a, b, c, d, e = sites
    network = network_of(sites, edges)
    static = {c: e, d: d}
    table = routes(network, a, static)
    assert table.path(c) == (a, e, d, c)
    assert table.next_hop(c) == e
    assert table.path(d) == (a, e, d)
    assert table.path(b) == (a, b)  # not configured: computed
    network.disconnect(a, e)
    network.settle()
    table = routes(network, a, static)
    assert table.path(c) == (a, b, c)  # e is down: the computed route
    assert table.path(d) == (a, b, c, d)


def test_a_static_next_hop_whose_only_way_on_comes_back_here_is_not_used() -> None:
    sites, edges = line(3)
    a, b, c = sites
    network = network_of([*sites, "spur"], [*edges, (a, "spur")])
    assert routes(network, a, {c: "spur"}).path(c) == (a, b, c)
    assert routes(network, a, {"spur": "spur"}).path("spur") == (a, "spur")
    # A static hop straight to a neighbour needs no advertisement of it yet.
    table = compute_routes({}, a, up_neighbours=frozenset({"x"}), static_next_hops={"x": "x"})
    assert table.path("x") == (a, "x")


def test_a_static_next_hop_naming_this_site_is_refused() -> None:
    with pytest.raises(ValueError):
        compute_routes({}, "a", up_neighbours=frozenset({"b"}), static_next_hops={"a": "b"})
    with pytest.raises(ValueError):
        compute_routes({}, "a", up_neighbours=frozenset({"b"}), static_next_hops={"b": "a"})


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, dict[str, int]]:
    """Up to 6 sites with symmetric links of cost 1 to 3 (ties are common)."""
    sites = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True))
    graph: dict[str, dict[str, int]] = {site: {} for site in sites}
    for x, y in itertools.combinations(sites, 2):
        cost = draw(st.sampled_from([None, 1, 1, 2, 3]))
        if cost is not None:
            graph[x][y] = graph[y][x] = cost
    return graph


def brute_force(graph: dict[str, dict[str, int]], source: str) -> dict[str, tuple[str, ...]]:
    """Every simple path from source, the cheapest kept, the smallest list of IDs on a tie."""
    best: dict[str, tuple[int, tuple[str, ...]]] = {}

    def walk(path: tuple[str, ...], cost: int) -> None:
        site = path[-1]
        if site not in best or (cost, path) < best[site]:
            best[site] = (cost, path)
        for neighbour, step in graph[site].items():
            if neighbour not in path:
                walk((*path, neighbour), cost + step)

    walk((source,), 0)
    return {site: path for site, (_, path) in best.items()}


@SETTINGS
@given(graphs(), st.randoms(use_true_random=False))
def test_paths_are_the_cheapest_and_do_not_depend_on_the_graphs_order(
    graph: dict[str, dict[str, int]], rng: random.Random
) -> None:
    source = sorted(graph)[0]
    shuffled = {
        site: dict(rng.sample(sorted(links.items()), len(links)))
        for site, links in rng.sample(sorted(graph.items()), len(graph))
    }
    assert shortest_paths(graph, source) == brute_force(graph, source)
    assert shortest_paths(shuffled, source) == shortest_paths(graph, source)
