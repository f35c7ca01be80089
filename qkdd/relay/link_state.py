"""A site's link-state database, sans-IO: LINK_STATE advertisements and their flooding.

Owns the advertisement's byte format (``LinkStateAdvertisement.encode``,
``decode_advertisement``) and ``LinkStateDatabase``: the newest advertisement of every site
heard of, this site's own (re-made when its links change and every LINK_STATE_REFRESH),
the flooding rules, expiry, and the two-way links routes are computed over
(``qkdd.relay.relay_routes``). The rules follow OSPF's flooding (RFC 2328 §13), simplified;
docs/protocol.md §11 specifies them and says what is left out.

The database does no I/O and reads no clock: the caller reports sessions coming up and
going down, passes every LINK_STATE received and the current (monotonic) time, sends the
``Outgoing`` messages it gets back over the authenticated peer sessions, and calls
``on_deadline`` at ``next_deadline()``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

from qkdd.config_reader import ID_PATTERN
from qkdd.constants import LINK_STATE_LIFETIME, LINK_STATE_MIN_INTERVAL, LINK_STATE_REFRESH
from qkdd.peer.peer_errors import RemoteProtocolError

# The advertisement's byte format (docs/protocol.md §11); a change makes a new number.
FORMAT_VERSION: Final = 1
# Links in one advertisement: far more peers than a site has (a site with all of them
# sends at most ~68 KiB).
MAX_LINKS: Final = 1024
MAX_SEQUENCE: Final = 2**64 - 1
# Sites whose advertisements one database holds: a neighbour that floods more origins than
# any real network has cannot grow it without bound (the rest are ignored).
MAX_ORIGINS: Final = 1024
MAX_LIFETIME: Final = 0xFFFF
MAX_COST: Final = 0xFFFF

_HEAD = struct.Struct(">QHH")  # sequence, lifetime, link count
_COST = struct.Struct(">H")


class LinkStateError(RemoteProtocolError):
    """A LINK_STATE advertisement is malformed (the only error decoding raises)."""


def _encode_id(site_id: str) -> bytes:
    raw = site_id.encode("ascii")
    return bytes([len(raw)]) + raw


def _encode_links(links: Iterable[tuple[str, int]]) -> bytes:
    return b"".join(_encode_id(neighbour) + _COST.pack(cost) for neighbour, cost in links)


def valid_site_id(site_id: str) -> bool:
    """Whether ``site_id`` is a site ID an advertisement may carry: as the config allows
    it, so ASCII, and sorting IDs as text sorts them bytewise."""
    return ID_PATTERN.fullmatch(site_id) is not None


@dataclass(frozen=True)
class LinkStateAdvertisement:
    """One site's up links to its direct peers, as that site made them.

    ``links`` is ``(neighbour, cost)`` pairs, neighbours in ascending order; ``lifetime`` is
    the whole seconds it has left (the origin sets it, each holder counts it down).
    """

    origin: str
    sequence: int
    lifetime: int
    links: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not valid_site_id(self.origin):
            raise LinkStateError(f"LINK_STATE origin {self.origin!r} is not a site ID")
        if not 1 <= self.sequence <= MAX_SEQUENCE:
            raise LinkStateError(f"LINK_STATE sequence number {self.sequence} out of range")
        if not 1 <= self.lifetime <= MAX_LIFETIME:
            raise LinkStateError(f"LINK_STATE lifetime {self.lifetime} out of range")
        if len(self.links) > MAX_LINKS:
            raise LinkStateError(f"LINK_STATE with {len(self.links)} links (most {MAX_LINKS})")
        previous = ""
        for neighbour, cost in self.links:
            if not valid_site_id(neighbour) or neighbour == self.origin:
                raise LinkStateError(f"LINK_STATE neighbour {neighbour!r} is not a peer's ID")
            # Ascending and unique: one encoding per set of links, so copies compare by bytes.
            if neighbour <= previous:
                raise LinkStateError("LINK_STATE neighbours not in ascending order")
            if not 1 <= cost <= MAX_COST:
                raise LinkStateError(f"LINK_STATE cost {cost} out of range")
            previous = neighbour

    def encode(self) -> bytes:
        return (
            bytes([FORMAT_VERSION])
            + _encode_id(self.origin)
            + _HEAD.pack(self.sequence, self.lifetime, len(self.links))
            + _encode_links(self.links)
        )

    def newer_than(self, other: LinkStateAdvertisement) -> bool:
        """Whether this is a newer instance of ``other``'s origin's advertisement: the higher
        sequence number; for equal numbers with different links (a site restarted and
        reused a number), the links whose encoding sorts last, so every site picks the same
        copy. The lifetime does not count: it is the same instance, counted down."""
        return (self.sequence, _encode_links(self.links)) > (
            other.sequence,
            _encode_links(other.links),
        )

    def same_instance(self, other: LinkStateAdvertisement) -> bool:
        return self.sequence == other.sequence and self.links == other.links


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, count: int, what: str) -> bytes:
        if self.at + count > len(self.data):
            raise LinkStateError(f"LINK_STATE truncated in {what}")
        chunk = self.data[self.at : self.at + count]
        self.at += count
        return chunk

    def site_id(self, what: str) -> str:
        # Latin-1 maps every byte to one character, so a non-ASCII byte fails the pattern.
        text = self.take(self.take(1, what)[0], what).decode("latin-1")
        if not valid_site_id(text):
            raise LinkStateError(f"LINK_STATE {what} is not a site ID")
        return text


def decode_advertisement(data: bytes) -> LinkStateAdvertisement:
    """Parse a LINK_STATE body; raises ``LinkStateError`` (only) if it is malformed."""
    reader = _Reader(bytes(data))
    version = reader.take(1, "format")[0]
    if version != FORMAT_VERSION:
        raise LinkStateError(f"LINK_STATE format {version}, this site reads {FORMAT_VERSION}")
    origin = reader.site_id("origin")
    sequence, lifetime, count = _HEAD.unpack(reader.take(_HEAD.size, "header"))
    if count > MAX_LINKS:
        raise LinkStateError(f"LINK_STATE with {count} links (most {MAX_LINKS})")
    links = []
    for _ in range(count):
        neighbour = reader.site_id("neighbour")
        (cost,) = _COST.unpack(reader.take(_COST.size, "cost"))
        links.append((neighbour, cost))
    if reader.at != len(reader.data):
        raise LinkStateError(f"LINK_STATE followed by {len(reader.data) - reader.at} bytes")
    return LinkStateAdvertisement(origin, sequence, lifetime, tuple(links))


@dataclass(frozen=True)
class Outgoing:
    """A LINK_STATE body to send to one up neighbour over its peer session."""

    neighbour: str
    data: bytes


@dataclass(frozen=True)
class _Held:
    advertisement: LinkStateAdvertisement
    received: float  # when it arrived here, with advertisement.lifetime left


def _left(lifetime: int, since: float, now: float) -> int:
    # Age in whole seconds, rounded up: a copy never claims more life than it has.
    return lifetime - math.ceil(now - since)


class LinkStateDatabase:
    """The newest advertisement of every site this one has heard of, and its own.

    Every method takes ``now`` (monotonic seconds, never decreasing) and returns what to
    send. ``generation`` grows whenever the links held change, so a caller recomputes its
    routes only then.
    """

    def __init__(
        self,
        site_id: str,
        now: float,
        *,
        first_sequence: int = 1,
        refresh: float = LINK_STATE_REFRESH,
        lifetime: int = LINK_STATE_LIFETIME,
        min_interval: float = LINK_STATE_MIN_INTERVAL,
    ) -> None:
        if not valid_site_id(site_id):
            raise ValueError(f"{site_id!r} is not a site ID")
        if not 1 <= lifetime <= MAX_LIFETIME or not 0 < refresh < lifetime:
            raise ValueError("need 0 < refresh < lifetime <= 65535")
        if not 0 <= min_interval < refresh:
            raise ValueError("need 0 <= min_interval < refresh")
        if not 1 <= first_sequence <= MAX_SEQUENCE:
            raise ValueError(f"first sequence number {first_sequence} out of range")
        self.site_id = site_id
        self._refresh = refresh
        self._lifetime = lifetime
        self._min_interval = min_interval
        self._links: dict[str, int] = {}  # this site's up links: neighbour -> cost
        self._held: dict[str, _Held] = {}  # other sites' newest advertisements
        # The highest sequence number of ours made or seen: the next one is above it.
        self._floor = first_sequence - 1
        self._pending = False  # a new advertisement of ours waits for min_interval
        self.generation = 0
        self._own = LinkStateAdvertisement(site_id, 1, lifetime, ())  # replaced just below
        self._own_made = now
        self._originate(now)

    # -- what it holds -------------------------------------------------------------------

    @property
    def up_neighbours(self) -> frozenset[str]:
        return frozenset(self._links)

    @property
    def own(self) -> LinkStateAdvertisement:
        """This site's current advertisement (its lifetime as made)."""
        return self._own

    def advertisements(self) -> dict[str, LinkStateAdvertisement]:
        """Every advertisement held, this site's own included, by origin."""
        held = {origin: entry.advertisement for origin, entry in self._held.items()}
        held[self.site_id] = self._own
        return held

    def graph(self) -> dict[str, dict[str, int]]:
        """The two-way links: ``a -> b -> cost`` only where a lists b and b lists a, as the
        larger of the two advertised costs (so both directions weigh the same)."""
        listed = {origin: dict(ad.links) for origin, ad in self.advertisements().items()}
        result: dict[str, dict[str, int]] = {}
        for origin, links in listed.items():
            for neighbour, cost in links.items():
                back = listed.get(neighbour, {}).get(origin)
                if back is not None:
                    result.setdefault(origin, {})[neighbour] = max(cost, back)
        return result

    def next_deadline(self) -> float:
        """When ``on_deadline`` must run next: the next advertisement of ours (a refresh, or
        one held back by min_interval) or the first expiry of another site's."""
        wait = self._min_interval if self._pending else self._refresh
        deadline = self._own_made + wait
        for entry in self._held.values():
            deadline = min(deadline, entry.received + entry.advertisement.lifetime)
        return deadline

    # -- events ----------------------------------------------------------------------------

    def link_up(self, neighbour: str, now: float, cost: int = 1) -> list[Outgoing]:
        """A session with ``neighbour`` came up (or its cost changed): advertise the link,
        and send that neighbour every advertisement held (it may have missed them all)."""
        if neighbour == self.site_id or not valid_site_id(neighbour):
            raise ValueError(f"{neighbour!r} is not a peer's site ID")
        if not 1 <= cost <= MAX_COST:
            raise ValueError(f"cost {cost} out of range 1..{MAX_COST}")
        self._expire(now)
        self._links[neighbour] = cost
        flood = self._request_origination(now)
        sync = [
            Outgoing(neighbour, data)
            for origin, entry in sorted(self._held.items())
            if (data := self._copy(entry, now)) is not None
        ]
        if not flood:  # ours goes too, as it stands; the new one follows min_interval later
            sync.append(Outgoing(neighbour, self._own_copy(now)))
        return sync + flood

    def link_down(self, neighbour: str, now: float) -> list[Outgoing]:
        """The session with ``neighbour`` ended: advertise the links without it."""
        self._expire(now)
        if self._links.pop(neighbour, None) is None:
            return []
        return self._request_origination(now)

    def receive(self, sender: str, data: bytes, now: float) -> list[Outgoing]:
        """A LINK_STATE body from neighbour ``sender``. Raises ``LinkStateError`` if it is
        malformed (the session that carried it is at fault)."""
        advertisement = decode_advertisement(data)
        self._expire(now)
        back = [sender] if sender in self._links else []
        if advertisement.origin == self.site_id:
            return self._receive_own(advertisement, back, now)
        entry = self._held.get(advertisement.origin)
        if entry is None and len(self._held) >= MAX_ORIGINS:
            return []  # full: a new origin is neither held nor flooded on
        if entry is None or advertisement.newer_than(entry.advertisement):
            changed = entry is None or entry.advertisement.links != advertisement.links
            self._held[advertisement.origin] = _Held(advertisement, now)
            self.generation += changed
            # Flood on to every other up neighbour; the sender has it.
            return [Outgoing(n, advertisement.encode()) for n in sorted(self._links) if n != sender]
        if entry.advertisement.newer_than(advertisement):
            # The sender holds an older copy: give it ours (RFC 2328 §13 step 8).
            copy = self._copy(entry, now)
            return [Outgoing(n, copy) for n in back] if copy is not None else []
        return []  # the same instance again: flooding has already passed here

    def on_deadline(self, now: float) -> list[Outgoing]:
        """Expire what is due, and make the advertisement of ours that is due."""
        self._expire(now)
        if self._pending and now >= self._own_made + self._min_interval:
            return self._originate(now)
        if now >= self._own_made + self._refresh:
            return self._originate(now)
        return []

    # -- inside ----------------------------------------------------------------------------

    def _receive_own(
        self, advertisement: LinkStateAdvertisement, back: list[str], now: float
    ) -> list[Outgoing]:
        if self._own.newer_than(advertisement):
            # A stale copy of ours: correct the sender.
            return [Outgoing(n, self._own_copy(now)) for n in back]
        if advertisement.same_instance(self._own):
            return []
        # Ours from before a restart (a higher number, or the same number with other
        # links): jump past it, so the next one of ours replaces it everywhere.
        self._floor = max(self._floor, advertisement.sequence)
        return self._request_origination(now)

    def _request_origination(self, now: float) -> list[Outgoing]:
        if now >= self._own_made + self._min_interval:
            return self._originate(now)
        self._pending = True
        return []

    def _originate(self, now: float) -> list[Outgoing]:
        # A 64-bit number counted up at most once per min_interval does not run out; one a
        # peer made up at the very top stays there (sessions are authenticated, sites trusted).
        sequence = min(self._floor + 1, MAX_SEQUENCE)
        links = tuple(sorted(self._links.items()))
        self.generation += links != self._own.links
        self._own = LinkStateAdvertisement(self.site_id, sequence, self._lifetime, links)
        self._own_made = now
        self._floor = sequence
        self._pending = False
        data = self._own.encode()
        return [Outgoing(n, data) for n in sorted(self._links)]

    def _own_copy(self, now: float) -> bytes:
        left = max(1, _left(self._lifetime, self._own_made, now))
        return replace(self._own, lifetime=left).encode()

    def _copy(self, entry: _Held, now: float) -> bytes | None:
        left = _left(entry.advertisement.lifetime, entry.received, now)
        if left < 1:
            return None  # about to expire: not worth passing on
        return replace(entry.advertisement, lifetime=left).encode()

    def _expire(self, now: float) -> None:
        for origin, entry in list(self._held.items()):
            if now >= entry.received + entry.advertisement.lifetime:
                del self._held[origin]
                self.generation += 1
