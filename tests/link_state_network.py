"""A small simulated network of `LinkStateDatabase`s for the link-state and route tests.

Sessions are pairs of sites marked up; what a database returns to send is queued as a
message in flight on that pair's session and delivered when the test says, in order or
not, with losses and duplicates if it asks. Time moves only when the test moves it, and
every database's deadline falling due on the way is run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from qkdd.relay.link_state import LinkStateDatabase, Outgoing


@dataclass
class LinkStateNetwork:
    rng: random.Random
    now: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # LinkStateDatabase keywords
    sites: dict[str, LinkStateDatabase] = field(default_factory=dict)
    up: set[frozenset[str]] = field(default_factory=set)
    in_flight: list[tuple[str, str, bytes]] = field(default_factory=list)  # sender, to, body
    delivered: int = 0

    def start(self, site: str, **extra: Any) -> LinkStateDatabase:
        self.sites[site] = LinkStateDatabase(site, self.now, **{**self.options, **extra})
        return self.sites[site]

    def stop(self, site: str) -> None:
        """The site goes away: its sessions end (its neighbours notice), its state is lost."""
        for pair in [pair for pair in self.up if site in pair]:
            (other,) = pair - {site}
            self.disconnect(site, other)
        del self.sites[site]

    def restart(self, site: str, **extra: Any) -> LinkStateDatabase:
        """The site restarts with an empty database and its sequence numbers from 1, and its
        sessions come back."""
        neighbours = sorted(other for pair in self.up if site in pair for other in pair - {site})
        self.stop(site)
        database = self.start(site, **extra)
        for other in neighbours:
            self.connect(site, other)
        return database

    def connect(self, a: str, b: str, cost: int = 1) -> None:
        self.up.add(frozenset((a, b)))
        self.post(a, self.sites[a].link_up(b, self.now, cost))
        self.post(b, self.sites[b].link_up(a, self.now, cost))

    def disconnect(self, a: str, b: str) -> None:
        self.up.discard(frozenset((a, b)))
        # What was in flight on the session is lost with it.
        self.in_flight = [m for m in self.in_flight if {m[0], m[1]} != {a, b}]
        self.post(a, self.sites[a].link_down(b, self.now))
        self.post(b, self.sites[b].link_down(a, self.now))

    def post(self, sender: str, outgoing: list[Outgoing]) -> None:
        for message in outgoing:
            assert frozenset((sender, message.neighbour)) in self.up, "sent over no session"
            self.in_flight.append((sender, message.neighbour, message.data))

    def deliver(
        self,
        *,
        most: int | None = None,
        reorder: bool = False,
        loss: float = 0.0,
        duplicate: float = 0.0,
    ) -> None:
        """Deliver messages in flight (and those they cause) until none is left, or ``most``."""
        count = 0
        while self.in_flight and (most is None or count < most):
            count += 1
            index = self.rng.randrange(len(self.in_flight)) if reorder else 0
            sender, to, data = self.in_flight.pop(index)
            if self.rng.random() < loss:
                continue
            if self.rng.random() < duplicate:
                self.in_flight.insert(
                    self.rng.randrange(len(self.in_flight) + 1), (sender, to, data)
                )
            self.delivered += 1
            self.post(to, self.sites[to].receive(sender, data, self.now))

    def advance(self, until: float, **delivery: Any) -> None:
        """Move time to ``until``, running each deadline that falls due on the way and
        delivering what it sends."""
        self.deliver(**delivery)
        while True:
            due = min(database.next_deadline() for database in self.sites.values())
            if due > until:
                break
            self.now = max(self.now, due)
            for site, database in sorted(self.sites.items()):
                if database.next_deadline() <= self.now:
                    self.post(site, database.on_deadline(self.now))
            self.deliver(**delivery)
        self.now = until

    def settle(self, **delivery: Any) -> None:
        """Deliver everything and let originations held back by the minimum interval go out."""
        interval = self.options.get("min_interval", 1.0)
        self.advance(self.now + 5 * interval + 0.001, **delivery)

    def views(self) -> dict[str, dict[str, tuple[int, tuple[tuple[str, int], ...]]]]:
        """Each site's database: origin -> (sequence number, links)."""
        return {
            site: {
                origin: (ad.sequence, ad.links) for origin, ad in database.advertisements().items()
            }
            for site, database in self.sites.items()
        }

    def converged(self) -> bool:
        """Whether every site holds the same database as every site it is connected to."""
        views = self.views()
        return all(views[other] == views[site] for site in views for other in self.component(site))

    def component(self, site: str) -> set[str]:
        """The sites connected to ``site`` through sessions that are up, itself included."""
        graph, found, todo = self.true_graph(), {site}, [site]
        while todo:
            for other in graph.get(todo.pop(), set()) - found:
                found.add(other)
                todo.append(other)
        return found

    def true_graph(self) -> dict[str, set[str]]:
        """The sessions that are up, as each site's set of neighbours."""
        graph: dict[str, set[str]] = {}
        for pair in self.up:
            a, b = sorted(pair)
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set()).add(a)
        return graph


def neighbour_sets(graph: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    return {site: set(links) for site, links in graph.items() if links}
