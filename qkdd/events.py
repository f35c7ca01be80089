"""Key events for local applications: what happened, to whom, the bus that carries it, and
the route that streams them:

    GET /qkdd/v1/events?kinds=K1,K2   a stream of JSON lines, one event each, for the SAE the
                                      caller acts as, from now on

Events (``kind``):

    keys_available  new ready keys for a pair whose master SAE is here (count added, ready)
    pool_low        a pair's ready keys fell below its threshold (a quarter of pool_size)
    keys_expired    keys erased because no application collected them in time (key IDs)
    keys_withdrawn  keys erased because the peer site lost its copy (key IDs)
    link_down       the authenticated session with a peer site ended (reason)
    link_up         it is back
    events_lost     this subscriber fell behind and missed ``lost`` events

An event concerns an SAE if the SAE is its master or slave; link events concern every
SAE. Every event carries ``seq`` (increasing per daemon run) and ``at`` (Unix time). A key
an application holds the ID of is stale once an event names it as expired or withdrawn;
keys_available says when the newest ready key was made (``newest_at``).

The bus is synchronous and never blocks a publisher: each subscriber has a bounded queue,
and one that falls behind loses its oldest events and is told how many. Waiting for the
next event is the Trio part (``Subscription.next``).

The route sits beside the ETSI API on the local Unix socket (``event_routes``). The caller
acts as an SAE exactly as on the ETSI routes. Without ``kinds`` every kind is sent. The
stream ends when the client closes it (or the daemon stops).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import trio

from qkdd.constants import MAX_IDS_PER_EVENT, QUEUE_LIMIT
from qkdd.etsi014.handler import caller_sae
from qkdd.http_server.exchange import (
    NDJSON_HEADERS,
    Answer,
    ApiRequest,
    Caller,
    Extension,
    Streamed,
    error_response,
    reject,
)
from qkdd.http_server.paths import EVENTS_PATH

KINDS: Final = frozenset(
    {
        "keys_available",
        "pool_low",
        "keys_expired",
        "keys_withdrawn",
        "link_down",
        "link_up",
        "events_lost",
    }
)


@dataclass(frozen=True)
class KeyEvent:
    kind: str
    seq: int
    at: float
    peer_site: str | None = None
    master_sae: str | None = None
    slave_sae: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def concerns(self, sae_id: str) -> bool:
        if self.master_sae is None and self.slave_sae is None:
            return True
        return sae_id in (self.master_sae, self.slave_sae)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"event": self.kind, "seq": self.seq, "at": self.at}
        if self.peer_site is not None:
            obj["peer_site_ID"] = self.peer_site
        if self.master_sae is not None:
            obj["master_SAE_ID"] = self.master_sae
        if self.slave_sae is not None:
            obj["slave_SAE_ID"] = self.slave_sae
        return obj | self.details


class Subscription:
    """One subscriber's queue: events that concern ``sae_id`` and are of ``kinds``."""

    def __init__(self, bus: EventBus, sae_id: str, kinds: frozenset[str], limit: int) -> None:
        self._bus = bus
        self.sae_id = sae_id
        self.kinds = kinds
        self._queue: deque[KeyEvent] = deque()
        self._limit = limit
        self._lost = 0
        self._wakeup = trio.Event()

    def offer(self, event: KeyEvent) -> None:
        if event.kind not in self.kinds or not event.concerns(self.sae_id):
            return
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self._lost += 1
        self._queue.append(event)
        self._wakeup.set()

    def take(self) -> list[KeyEvent]:
        """Everything queued, oldest first, after an events_lost marker if some were lost."""
        out = []
        if self._lost:
            out.append(self._bus.make("events_lost", details={"lost": self._lost}))
            self._lost = 0
        out.extend(self._queue)
        self._queue.clear()
        return out

    async def next(self) -> list[KeyEvent]:
        """Wait until at least one event is queued; return all that are."""
        while not self._queue and not self._lost:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        return self.take()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._seq = itertools.count(1)
        self._subscribers: list[Subscription] = []

    def make(self, kind: str, **fields: Any) -> KeyEvent:
        return KeyEvent(kind, next(self._seq), self._clock(), **fields)

    def publish(self, kind: str, **fields: Any) -> KeyEvent:
        event = self.make(kind, **fields)
        for subscriber in list(self._subscribers):
            subscriber.offer(event)
        return event

    def subscribe(
        self, sae_id: str, kinds: Iterable[str] = KINDS, limit: int = QUEUE_LIMIT
    ) -> Subscription:
        subscription = Subscription(self, sae_id, frozenset(kinds) | {"events_lost"}, limit)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)


def chunks(items: list[str], size: int = MAX_IDS_PER_EVENT) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class PoolWatch:
    """Turns successive readings of a pair's ready count into events (sans-IO)."""

    threshold: int
    last: int | None = None
    low: bool = False

    def reading(self, ready: int, newest_at: float | None) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if self.last is not None and ready > self.last:
            added = {"added": ready - self.last, "ready": ready, "newest_at": newest_at}
            out.append(("keys_available", added))
        is_low = ready < self.threshold
        if is_low and not self.low:
            out.append(("pool_low", {"ready": ready, "threshold": self.threshold}))
        self.low = is_low
        self.last = ready
        return out


# -- the route ------------------------------------------------------------------------------


def event_routes(bus: EventBus, is_local_sae: Callable[[str], bool]) -> dict[str, Extension]:
    """The event route, for ``RequestHandler(extensions=...)``: ``bus``'s events for the SAE
    the caller acts as (one ``is_local_sae`` accepts)."""

    def events_route(request: ApiRequest, caller: Caller) -> Answer:
        if request.method != "GET":
            return error_response(
                405, "method not allowed here; use GET", headers=(("allow", "GET"),)
            )
        sae = caller_sae(request, caller, is_local_sae)
        query = parse_qs(urlsplit(request.target).query, keep_blank_values=True)
        unknown = set(query) - {"kinds"}
        if unknown:
            reject(400, f"unknown query parameters {', '.join(sorted(unknown))}")
        kinds = set(KINDS)
        if "kinds" in query:
            kinds = {k for value in query["kinds"] for k in value.split(",") if k}
            bad = kinds - KINDS
            if bad or not kinds:
                reject(
                    400,
                    f"kinds must be a comma-separated list of {', '.join(sorted(KINDS))}",
                    {"kinds": ",".join(query["kinds"])},
                )
        # Subscribe now, not when the stream starts: nothing between the two is missed.
        subscription = bus.subscribe(sae, kinds)
        return Streamed(
            200,
            NDJSON_HEADERS,
            lambda: _stream(subscription),
            note=f"sae={sae} events={','.join(sorted(kinds))}",
        )

    return {EVENTS_PATH: events_route}


async def _stream(subscription: Subscription) -> AsyncIterator[bytes]:
    try:
        while True:
            events = await subscription.next()
            yield b"".join(
                json.dumps(e.to_json(), separators=(",", ":")).encode() + b"\n" for e in events
            )
    finally:
        subscription.close()
