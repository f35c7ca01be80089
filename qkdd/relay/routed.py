"""ROUTED: bytes between two end sites, passed on hop by hop over the direct links' peer
sessions (sans-IO). Owns the envelope's byte format, the forwarding decision at each site
and the stream table of one site's ends (docs/protocol.md §12.1).

An end-to-end session between two sites without a direct link runs the peer protocol of
§1–§7 unchanged, end to end, over a *routed stream*: the dialling site OPENs a stream to
the other, sends the session's bytes in DATA envelopes, and either end CLOSEs it. Relays
forward envelopes by their destination and the route table, and see only the end-to-end
session's sealed frames: they can neither read nor forge the handshake or the agreement
inside (the end sites authenticate each other with pinned ML-DSA keys, then PSKs).

A relay that cannot forward an envelope (no route, hop limit spent, the next session down)
answers its source with a CLOSE naming why, so the end learns it at once rather than at
its session's heartbeat timeout. Envelopes of one stream may take another path after a
route change; the end-to-end session's frame counters then refuse what arrives out of
order and the session is dialled again, as after a broken TCP connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from qkdd.config_reader import ID_PATTERN
from qkdd.peer.peer_errors import RemoteProtocolError
from qkdd.relay.hop_seal import MAX_PATH_SITES
from qkdd.relay.relay_routes import RouteTable

ROUTED_FORMAT_VERSION: Final = 1
STREAM_ID_SIZE: Final = 8
# An envelope passes at most this many sites after its source (the longest path).
MAX_HOPS: Final = MAX_PATH_SITES - 1
# A DATA envelope carries at most this much of its stream (a sender splits larger sends):
# small enough that one stream never holds a hop session's frames for long.
MAX_ROUTED_DATA: Final = 64 * 1024
MAX_REASON_BYTES: Final = 256


class RoutedFrameError(RemoteProtocolError):
    """A ROUTED body that is malformed."""


class RoutedKind(enum.IntEnum):
    OPEN = 1  # a new stream from source to destination
    DATA = 2  # the next bytes of the stream
    CLOSE = 3  # the stream ends (the payload says why, UTF-8)


@dataclass(frozen=True)
class RoutedEnvelope:
    """One ROUTED body. ``stream_id`` names the stream together with the site that opened
    it (``opener``): both ends' envelopes of a stream carry the same ID."""

    source: str
    destination: str
    hops_left: int
    kind: RoutedKind
    stream_id: bytes
    opener_is_source: bool
    payload: bytes = field(default=b"", repr=False)

    @property
    def opener(self) -> str:
        return self.source if self.opener_is_source else self.destination

    def encode(self) -> bytes:
        return b"".join(
            (
                bytes([ROUTED_FORMAT_VERSION, self.hops_left]),
                _encode_id(self.source),
                _encode_id(self.destination),
                bytes([self.kind, 1 if self.opener_is_source else 0]),
                self.stream_id,
                self.payload,
            )
        )

    def reply(self, kind: RoutedKind, payload: bytes = b"") -> RoutedEnvelope:
        """An envelope of the same stream back to this one's source."""
        return RoutedEnvelope(
            self.destination,
            self.source,
            MAX_HOPS,
            kind,
            self.stream_id,
            not self.opener_is_source,
            payload,
        )


def _encode_id(site_id: str) -> bytes:
    raw = site_id.encode("ascii")
    return bytes([len(raw)]) + raw


def decode_routed(body: bytes) -> RoutedEnvelope:
    """Parse a ROUTED body; ``RoutedFrameError`` if it is malformed."""
    at = 0

    def take(count: int, what: str) -> bytes:
        nonlocal at
        if at + count > len(body):
            raise RoutedFrameError(f"ROUTED truncated in {what}")
        chunk = body[at : at + count]
        at += count
        return chunk

    def site(what: str) -> str:
        text = take(take(1, what)[0], what).decode("latin-1")
        if not ID_PATTERN.fullmatch(text):
            raise RoutedFrameError(f"ROUTED {what} is not a site ID")
        return text

    version, hops_left = take(2, "header")
    if version != ROUTED_FORMAT_VERSION:
        raise RoutedFrameError(f"ROUTED format {version}, this site reads {ROUTED_FORMAT_VERSION}")
    if hops_left > MAX_HOPS:
        raise RoutedFrameError(f"ROUTED with {hops_left} hops left (most {MAX_HOPS})")
    source, destination = site("source"), site("destination")
    if source == destination:
        raise RoutedFrameError("ROUTED from a site to itself")
    kind_byte, opener = take(2, "kind")
    try:
        kind = RoutedKind(kind_byte)
    except ValueError:
        raise RoutedFrameError(f"ROUTED of unknown kind {kind_byte}") from None
    if opener not in (0, 1):
        raise RoutedFrameError(f"ROUTED opener flag {opener}, not 0 or 1")
    stream_id = take(STREAM_ID_SIZE, "stream ID")
    payload = body[at:]
    limit = MAX_ROUTED_DATA if kind is RoutedKind.DATA else MAX_REASON_BYTES
    if len(payload) > limit:
        raise RoutedFrameError(f"ROUTED {kind.name} carries {len(payload)} bytes (most {limit})")
    if kind is RoutedKind.OPEN and (payload or not opener):
        raise RoutedFrameError("ROUTED OPEN comes from the opener and carries nothing")
    return RoutedEnvelope(source, destination, hops_left, kind, stream_id, bool(opener), payload)


# -- What a site does with an envelope ----------------------------------------------------


@dataclass(frozen=True)
class Deliver:
    """The envelope is for this site: hand it to the stream table."""

    envelope: RoutedEnvelope


@dataclass(frozen=True)
class Forward:
    """Send ``body`` (the envelope, one hop fewer left) to neighbour ``peer``."""

    peer: str
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class Bounce:
    """It cannot go on: send ``envelope`` (a CLOSE back to the source, with the reason)
    whichever way this site routes it, or drop it if that fails too."""

    envelope: RoutedEnvelope | None
    reason: str


RouteAction = Deliver | Forward | Bounce


def route_envelope(
    envelope: RoutedEnvelope, site_id: str, routes: RouteTable, up: frozenset[str]
) -> RouteAction:
    """Where an envelope goes from this site: delivered here, forwarded to the next hop
    toward its destination (whose session is in ``up``), or bounced with the reason. A
    CLOSE that cannot go on is dropped (``Bounce(None, …)``): nobody waits for it."""
    if envelope.destination == site_id:
        return Deliver(envelope)
    next_hop = routes.next_hop(envelope.destination)
    reason = None
    if next_hop is None:
        reason = f"site {site_id} has no route to {envelope.destination}"
    elif next_hop not in up:
        reason = f"the session from {site_id} to {next_hop} is down"
    elif envelope.hops_left == 0:
        reason = f"hop limit reached at {site_id}"
    if reason is None:
        assert next_hop is not None
        onward = RoutedEnvelope(
            envelope.source,
            envelope.destination,
            envelope.hops_left - 1,
            envelope.kind,
            envelope.stream_id,
            envelope.opener_is_source,
            envelope.payload,
        )
        return Forward(next_hop, onward.encode())
    if envelope.kind is RoutedKind.CLOSE:
        return Bounce(None, reason)
    # The CLOSE names the stream's far end as its source: the end that gets it looks its
    # stream up by opener and ID, whichever site sent it.
    return Bounce(envelope.reply(RoutedKind.CLOSE, reason.encode()[:MAX_REASON_BYTES]), reason)


def split_data(data: bytes) -> list[bytes]:
    """A stream's bytes as DATA payloads of at most ``MAX_ROUTED_DATA`` each."""
    return [data[i : i + MAX_ROUTED_DATA] for i in range(0, len(data), MAX_ROUTED_DATA)]
