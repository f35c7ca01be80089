"""The relayed transfers of one site, in whichever role it has in each (source, relay,
destination), sans-IO: frames and ACKs go in with the time, actions come out, and
``next_deadline()`` says when ``poll(now)`` must be called next at the latest. Sealing one
hop is ``qkdd.relay.hop_seal``; the QKD keys come from the caller's store, each once, and
the caller bounds how many of a link's keys relaying may take (the daemon: each link's
relay pads, docs/protocol.md §10.5).

One transfer along ``path = (source, relay..., destination)``::

    source       start(material, keys of hop 0)              -> SendRelayKeys to path[1]
    relay i      admit(frame)           header fits, not seen
                 receive(frame, keys)   verify, decrypt      -> SendRelayAck to path[i-1]
                                                             -> NextHopNeeded
                 forward(keys of hop i) seal for the next hop -> SendRelayKeys to path[i+1]
                 receive_ack(ack)       erase the material   -> HopAcked
    destination  admit, receive         verify, decrypt      -> SendRelayAck to path[-2]
                                                             -> MaterialDelivered
    source       receive_ack(ack)       keep the material    -> HopAcked
                 release_confirmed()    the end-to-end confirmation came: hand it over

What is held, and until when:

- The source keeps its copy of the material from ``start`` until ``release_confirmed``
  (the destination's end-to-end confirmation; the exchange that carries it is not part
  of this module) or until ``confirm_timeout`` after the start, when the transfer is
  abandoned and the copy dropped.
- A relay holds the material from ``receive`` until the next hop's ACK verifies, then drops
  it; if its next-hop keys do not come, or the ACK does not, within ``hop_timeout``, the
  transfer is abandoned and the material dropped.
- The destination holds nothing: ``MaterialDelivered`` hands the material to the caller.
- A sender holds a hop's ACK key until that ACK; nobody holds a pad after sealing or
  opening. "Dropped" is as far as Python goes: the state's references are removed, the
  bytes themselves are not overwritten.

QKD keys are never given back: a transfer that is abandoned, or a frame or ACK whose tag
did not verify (one verification per one-time key, so the forgery bound holds), leaves the
keys of its hops consumed at both ends. A transfer ID once seen is refused for
``seen_memory`` after its transfer ended (a replayed frame); after that the keys it names
are long consumed, and the caller's store refuses them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from qkdd.relay.hop_seal import (
    MAX_PATH_SITES,
    HopKeys,
    RelayAck,
    RelayFrameError,
    RelayKeysFrame,
    RelayUsageError,
    SealedHop,
    make_ack,
    open_hop,
    seal_hop,
    verify_ack,
)

# A hop's receiver may wait for its own QKD keys (its device delivers them a little after
# the sender's), as a batch's slave does: the allowance of a batch reply
# (qkdd.peer.batching.BATCH_REPLY_TIMEOUT, docs/protocol.md §8).
HOP_TIMEOUT: Final = 15.0
# The end-to-end confirmation follows every hop of the longest path, then comes back.
CONFIRM_TIMEOUT: Final = 2 * MAX_PATH_SITES * HOP_TIMEOUT
# Long past any deadline of a transfer: a frame replayed later names consumed keys.
SEEN_MEMORY: Final = 3600.0


class RelayRejected(RelayFrameError):
    """A frame or ACK that fits no transfer of this site (replayed, on the wrong hop, or for
    an unknown or finished transfer)."""


class RelayRole(enum.Enum):
    SOURCE = "source"
    RELAY = "relay"
    DESTINATION = "destination"


class _Phase(enum.Enum):
    ADMITTED = "admitted"  # the header fits; the caller is taking the keys it names
    AWAITING_KEYS = "awaiting next-hop keys"
    AWAITING_ACK = "awaiting the next hop's ACK"
    AWAITING_CONFIRMATION = "awaiting end-to-end confirmation"


_TIMEOUT_REASONS: Final = {
    _Phase.ADMITTED: "the keys of an admitted frame did not come in time",
    _Phase.AWAITING_KEYS: "no next-hop keys in time",
    _Phase.AWAITING_ACK: "the next hop did not acknowledge in time",
    _Phase.AWAITING_CONFIRMATION: "no end-to-end confirmation in time",
}


@dataclass(frozen=True)
class SendRelayKeys:
    peer: str
    transfer_id: bytes
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class SendRelayAck:
    peer: str
    transfer_id: bytes
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class NextHopNeeded:
    """A relay holds the material: take keys of the link to ``peer`` for ``material_size``
    bytes (``hop_seal.hop_keys_needed``) and call ``forward``."""

    transfer_id: bytes
    peer: str
    material_size: int


@dataclass(frozen=True)
class MaterialDelivered:
    transfer_id: bytes
    path: tuple[str, ...]
    key_bits: int
    material: bytes = field(repr=False)


@dataclass(frozen=True)
class HopAcked:
    """The next hop has the material: a relay dropped its copy, a source keeps its own
    until the end-to-end confirmation."""

    transfer_id: bytes
    role: RelayRole


@dataclass(frozen=True)
class TransferAbandoned:
    transfer_id: bytes
    role: RelayRole
    reason: str


RelayAction = (
    SendRelayKeys | SendRelayAck | NextHopNeeded | MaterialDelivered | HopAcked | TransferAbandoned
)


@dataclass(eq=False)
class _Transfer:
    transfer_id: bytes
    role: RelayRole
    path: tuple[str, ...]
    position: int  # this site's index in the path
    phase: _Phase
    deadline: float
    key_bits: int = 0
    confirm_deadline: float | None = None
    incoming: RelayKeysFrame | None = field(default=None, repr=False)
    material: bytes | None = field(default=None, repr=False)
    sent: SealedHop | None = field(default=None, repr=False)

    @property
    def next_peer(self) -> str:
        return self.path[self.position + 1]


class RelaySite:
    """Every transfer this site takes part in. What relaying may take from each link is
    the caller's to bound (the daemon keeps a pool of relay pads per link, filled only once
    the link's own pools are full: docs/protocol.md §10.5)."""

    def __init__(
        self,
        site_id: str,
        *,
        hop_timeout: float = HOP_TIMEOUT,
        confirm_timeout: float = CONFIRM_TIMEOUT,
        seen_memory: float = SEEN_MEMORY,
    ) -> None:
        self.site_id = site_id
        self._hop_timeout = hop_timeout
        self._confirm_timeout = confirm_timeout
        self._seen_memory = seen_memory
        self._transfers: dict[bytes, _Transfer] = {}
        # Transfer IDs whose transfer ended here, and until when they are remembered.
        self._seen: dict[bytes, float] = {}

    def __repr__(self) -> str:
        return f"RelaySite({self.site_id!r}, transfers={len(self._transfers)})"

    # -- Source ----------------------------------------------------------------------------

    def start(
        self,
        transfer_id: bytes,
        path: Sequence[str],
        key_bits: int,
        material: bytes,
        keys: HopKeys,
        *,
        now: float,
    ) -> list[RelayAction]:
        """Send ``material`` (whole keys of ``key_bits``) along ``path``, which starts here,
        sealed under ``keys`` of the first hop."""
        path = tuple(path)
        if not path or path[0] != self.site_id:
            raise RelayUsageError(f"a path started at {self.site_id} begins with it")
        if self._known(transfer_id):
            raise RelayUsageError("this transfer ID is already in use")
        sealed = seal_hop(transfer_id, path, 0, key_bits, material, keys)
        self._transfers[transfer_id] = _Transfer(
            transfer_id,
            RelayRole.SOURCE,
            path,
            0,
            _Phase.AWAITING_ACK,
            now + self._hop_timeout,
            key_bits=key_bits,
            confirm_deadline=now + self._confirm_timeout,
            material=material,
            sent=sealed,
        )
        return [SendRelayKeys(path[1], transfer_id, sealed.frame.encode())]

    def release_confirmed(self, transfer_id: bytes, now: float) -> bytes:
        """The end-to-end confirmation came (the destination holds the material): the
        source's copy leaves this state, for the end-to-end key derivation."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None or transfer.role is not RelayRole.SOURCE:
            raise RelayUsageError("no transfer from this site with that ID is open")
        assert transfer.material is not None
        material = transfer.material
        self._end(transfer, now)
        return material

    # -- Receiving a frame (relay or destination) ----------------------------------------

    def admit(self, frame: RelayKeysFrame, sender: str, *, now: float) -> None:
        """Check a RELAY_KEYS frame from ``sender`` before the caller takes the QKD keys
        its header names (then ``receive``): it must be for the hop ``sender`` -> this
        site and for a transfer not seen before. ``RelayRejected`` otherwise, and nothing
        is held."""
        header = frame.header
        problem = header.hop_problem(sender, self.site_id)
        if problem is not None:
            raise RelayRejected(problem)
        if self._known(header.transfer_id):
            raise RelayRejected("RELAY_KEYS for a transfer already seen here (a replay)")
        position = header.hop_index + 1
        last = position == len(header.path) - 1
        self._transfers[header.transfer_id] = _Transfer(
            header.transfer_id,
            RelayRole.DESTINATION if last else RelayRole.RELAY,
            header.path,
            position,
            _Phase.ADMITTED,
            now + self._hop_timeout,
            key_bits=header.key_bits,
            incoming=frame,
        )

    def receive(
        self, frame: RelayKeysFrame, sender: str, keys: HopKeys, now: float
    ) -> list[RelayAction]:
        """Open an admitted frame with the keys its header names. If the tag does not
        verify, or the keys do not fit, the transfer is abandoned (its keys stay consumed)
        and the error raised."""
        transfer = self._transfers.get(frame.header.transfer_id)
        if transfer is None or transfer.phase is not _Phase.ADMITTED:
            raise RelayRejected("RELAY_KEYS that was not admitted")
        if transfer.incoming != frame or transfer.path[transfer.position - 1] != sender:
            raise RelayRejected("RELAY_KEYS is not the frame admitted for this transfer")
        try:
            opened = open_hop(frame, keys, sender=sender, receiver=self.site_id)
        except RelayFrameError:
            self._end(transfer, now)
            raise
        transfer.incoming = None
        actions: list[RelayAction] = [
            SendRelayAck(sender, transfer.transfer_id, make_ack(frame, opened.ack_key).encode())
        ]
        if transfer.role is RelayRole.DESTINATION:
            self._end(transfer, now)
            actions.append(
                MaterialDelivered(
                    transfer.transfer_id, transfer.path, transfer.key_bits, opened.material
                )
            )
            return actions
        transfer.material = opened.material
        transfer.phase = _Phase.AWAITING_KEYS
        transfer.deadline = now + self._hop_timeout
        actions.append(
            NextHopNeeded(transfer.transfer_id, transfer.next_peer, len(opened.material))
        )
        return actions

    # -- Relay -------------------------------------------------------------------------------

    def forward(self, transfer_id: bytes, keys: HopKeys, *, now: float) -> list[RelayAction]:
        """Seal the held material for the next hop under ``keys`` of that link. Until this
        is called the transfer waits for them, at most until its deadline."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None or transfer.phase is not _Phase.AWAITING_KEYS:
            raise RelayUsageError("no transfer here waits for next-hop keys with that ID")
        assert transfer.material is not None
        sealed = seal_hop(
            transfer_id,
            transfer.path,
            transfer.position,
            transfer.key_bits,
            transfer.material,
            keys,
        )
        transfer.sent = sealed
        transfer.phase = _Phase.AWAITING_ACK
        transfer.deadline = now + self._hop_timeout
        return [SendRelayKeys(transfer.next_peer, transfer_id, sealed.frame.encode())]

    # -- ACKs (source or relay) ------------------------------------------------------------

    def receive_ack(self, ack: RelayAck, sender: str, now: float) -> list[RelayAction]:
        """The next hop's RELAY_ACK. A relay drops the material; a source keeps it until
        ``release_confirmed``. An ACK whose tag does not verify abandons the transfer."""
        transfer = self._transfers.get(ack.transfer_id)
        if (
            transfer is None
            or transfer.phase is not _Phase.AWAITING_ACK
            or transfer.sent is None
            or ack.hop_index != transfer.position
            or sender != transfer.next_peer
        ):
            raise RelayRejected("RELAY_ACK for no frame this site awaits an ACK of")
        try:
            verify_ack(ack, transfer.sent.frame, transfer.sent.ack_key)
        except RelayFrameError:
            self._end(transfer, now)
            raise
        transfer.sent = None
        if transfer.role is RelayRole.RELAY:
            self._end(transfer, now)
        else:
            assert transfer.confirm_deadline is not None
            transfer.phase = _Phase.AWAITING_CONFIRMATION
            transfer.deadline = transfer.confirm_deadline
        return [HopAcked(ack.transfer_id, transfer.role)]

    # -- Time ------------------------------------------------------------------------------

    def poll(self, now: float) -> list[RelayAction]:
        """Abandon every transfer whose deadline passed (its material and keys dropped,
        its QKD keys consumed for good), and forget transfer IDs seen long ago."""
        actions: list[RelayAction] = []
        for transfer in [t for t in self._transfers.values() if now > t.deadline]:
            actions.append(
                TransferAbandoned(
                    transfer.transfer_id, transfer.role, _TIMEOUT_REASONS[transfer.phase]
                )
            )
            self._end(transfer, now)
        for transfer_id in [i for i, until in self._seen.items() if now > until]:
            del self._seen[transfer_id]
        return actions

    def next_deadline(self) -> float | None:
        return min((t.deadline for t in self._transfers.values()), default=None)

    def abandon(self, transfer_id: bytes, reason: str, now: float) -> list[RelayAction]:
        """Give a transfer up now (e.g. the next hop's link is gone)."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return []
        self._end(transfer, now)
        return [TransferAbandoned(transfer_id, transfer.role, reason)]

    # -- What is held ----------------------------------------------------------------------

    def held_material(self, transfer_id: bytes) -> bytes | None:
        """The material this site holds for a transfer now, if any."""
        transfer = self._transfers.get(transfer_id)
        return None if transfer is None else transfer.material

    def open_transfers(self) -> dict[bytes, str]:
        """Each open transfer's phase, by transfer ID."""
        return {i: t.phase.value for i, t in self._transfers.items()}

    def _known(self, transfer_id: bytes) -> bool:
        return transfer_id in self._transfers or transfer_id in self._seen

    def _end(self, transfer: _Transfer, now: float) -> None:
        """Drop everything held for the transfer; remember its ID against replays."""
        transfer.material = None
        transfer.sent = None
        transfer.incoming = None
        del self._transfers[transfer.transfer_id]
        self._seen[transfer.transfer_id] = now + self._seen_memory
