"""Routes to other sites over the two-way links of the link-state database (sans-IO).

Owns the path choice of docs/protocol.md §11: Dijkstra's shortest paths from this site
over ``LinkStateDatabase.graph()``, ties broken by site ID so every run (and every site
with the same database) picks the same path; static next hops from config take precedence
for their destination while that neighbour is up; ``RouteTable`` answers with the next hop
or the whole path (site IDs in order), ``None`` for a site it cannot reach.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

Graph = Mapping[str, Mapping[str, int]]


def shortest_paths(
    graph: Graph, source: str, avoid: frozenset[str] = frozenset()
) -> dict[str, tuple[str, ...]]:
    """The cheapest path from ``source`` to every site it reaches in ``graph`` (``a -> b ->
    cost``, costs positive), not passing through ``avoid``: among paths of equal cost, the
    one whose list of site IDs sorts first. The source maps to ``(source,)``."""
    # Labels compare as (cost, path): a prefix of the chosen path is the chosen path to
    # that site (a smaller prefix would make a smaller whole), so Dijkstra stays exact.
    best: dict[str, tuple[int, tuple[str, ...]]] = {source: (0, (source,))}
    queue: list[tuple[int, tuple[str, ...]]] = [(0, (source,))]
    settled: set[str] = set()
    while queue:
        cost, path = heapq.heappop(queue)
        site = path[-1]
        if site in settled:
            continue
        settled.add(site)
        for neighbour, step in graph.get(site, {}).items():
            if neighbour in settled or neighbour in avoid:
                continue
            label = (cost + step, (*path, neighbour))
            if neighbour not in best or label < best[neighbour]:
                best[neighbour] = label
                heapq.heappush(queue, label)
    return {site: path for site, (_, path) in best.items()}


@dataclass(frozen=True)
class RouteTable:
    """This site's route to every site it reaches: ``paths[d]`` starts here, ends at d."""

    source: str
    paths: Mapping[str, tuple[str, ...]]

    def path(self, destination: str) -> tuple[str, ...] | None:
        """Site IDs from here to ``destination`` in order (just ``(source,)`` for this site
        itself); ``None`` when it is unreachable."""
        return self.paths.get(destination)

    def next_hop(self, destination: str) -> str | None:
        """The neighbour to hand over to for ``destination``; ``None`` when it is
        unreachable, or is this site."""
        path = self.paths.get(destination)
        return path[1] if path is not None and len(path) > 1 else None


def compute_routes(
    graph: Graph,
    source: str,
    *,
    up_neighbours: frozenset[str] = frozenset(),
    static_next_hops: Mapping[str, str] | None = None,
) -> RouteTable:
    """Routes from ``source`` over ``graph`` (the database's two-way links).

    ``static_next_hops`` maps a destination to the neighbour to hand it to. It is used
    while that neighbour is in ``up_neighbours`` (its session is up) and it is the
    destination, or the graph has a path from it to the destination that does not come
    back through here; otherwise the destination gets its computed route.
    """
    paths = shortest_paths(graph, source)
    from_hop: dict[str, dict[str, tuple[str, ...]]] = {}
    for destination, hop in sorted((static_next_hops or {}).items()):
        if source in (destination, hop):
            raise ValueError(f"static next hop {destination} -> {hop} names this site")
        if hop not in up_neighbours:
            continue
        if hop == destination:
            paths[destination] = (source, destination)
            continue
        if hop not in from_hop:
            from_hop[hop] = shortest_paths(graph, hop, avoid=frozenset({source}))
        rest = from_hop[hop].get(destination)
        if rest is not None:
            paths[destination] = (source, *rest)
    return RouteTable(source, paths)
