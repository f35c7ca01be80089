"""A chain of sites for relay tests: each link's QKD material is one random byte string both
of its sites hold, cut into keys; each end takes each key once (as its store would). The
sending end of a hop picks the next fresh keys and the byte ranges it handed out are
recorded, so a test can check no byte is ever used twice. ``Chain`` joins ``RelaySite``
objects with a simulated clock and an in-memory wire that a test may tamper with, and may
withhold a relay's next-hop keys (as an empty pool of relay pads would)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from qkdd.relay.hop_seal import (
    HopHeader,
    HopKey,
    HopKeys,
    decode_relay_ack,
    decode_relay_keys,
    hop_keys_needed,
)
from qkdd.relay.relay_state import (
    HopAcked,
    MaterialDelivered,
    NextHopNeeded,
    RelayAction,
    RelaySite,
    SendRelayAck,
    SendRelayKeys,
    TransferAbandoned,
)

QKD_KEY_SIZE = 32  # bytes: 256-bit QKD keys


class KeyNotHeld(Exception):
    """The receiving end's store has no such QKD key (unknown, or already consumed)."""


class QkdLink:
    """The QKD keys one hop's two sites share."""

    def __init__(self, hop: int, keys: int = 256, seed: int = 0) -> None:
        self.hop = hop
        self.material = random.Random(seed * 1000 + hop).randbytes(keys * QKD_KEY_SIZE)
        self.keys = keys
        self._next = 0
        # The key IDs the receiving end took (each once).
        self.receiver_took: set[bytes] = set()
        # (hop, first byte, end) of every key the sending end handed out, in order.
        self.ranges: list[tuple[int, int, int]] = []

    def key_id(self, index: int) -> bytes:
        return bytes([0xA0, self.hop]) + index.to_bytes(14, "big")

    def _key(self, index: int) -> HopKey:
        start = index * QKD_KEY_SIZE
        return HopKey(self.key_id(index), self.material[start : start + QKD_KEY_SIZE])

    def pick(self, count: int) -> list[HopKey]:
        picked = []
        for _ in range(count):
            index = self._next
            self._next += 1
            self.ranges.append((self.hop, index * QKD_KEY_SIZE, (index + 1) * QKD_KEY_SIZE))
            picked.append(self._key(index))
        return picked

    def pick_hop_keys(self, material_size: int) -> HopKeys:
        pads, macs = hop_keys_needed(material_size, QKD_KEY_SIZE)
        return HopKeys(tuple(self.pick(pads)), tuple(self.pick(macs)))

    def fetch(self, header: HopHeader) -> HopKeys:
        """The receiving end takes the keys a header names, each once."""
        by_id = {self.key_id(i): i for i in range(self.keys)}

        def take(key_id: bytes) -> HopKey:
            if key_id not in by_id or key_id in self.receiver_took:
                raise KeyNotHeld(key_id.hex())
            self.receiver_took.add(key_id)
            return self._key(by_id[key_id])

        return HopKeys(
            tuple(take(i) for i in header.pad_key_ids), tuple(take(i) for i in header.mac_key_ids)
        )


def flipped(body: bytes, bit: int) -> bytes:
    """``body`` with one bit inverted."""
    out = bytearray(body)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def site_names(hops: int) -> list[str]:
    return [f"site-{chr(ord('a') + i)}" for i in range(hops + 1)]


# A wire hook: (hop index, "keys" or "ack", body) -> the body delivered, or None (dropped).
Tamper = Callable[[int, str, bytes], bytes | None]


@dataclass
class Chain:
    """Sites ``names[0] .. names[hops]``, each a RelaySite, joined by one QkdLink per hop."""

    hops: int
    tamper: Tamper | None = None
    # Sites (by index) whose next-hop keys never come.
    withheld: frozenset[int] = frozenset()
    seed: int = 0
    now: float = 1000.0
    names: list[str] = field(init=False)
    links: list[QkdLink] = field(init=False)
    sites: dict[str, RelaySite] = field(init=False)
    # What each site did or saw: (site, action), and what each relay held after a receive.
    log: list[tuple[str, RelayAction]] = field(default_factory=list)
    relay_views: dict[str, list[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = site_names(self.hops)
        self.links = [QkdLink(i, seed=self.seed) for i in range(self.hops)]
        self.sites = {name: RelaySite(name) for name in self.names}

    def site(self, index: int) -> RelaySite:
        return self.sites[self.names[index]]

    def start(self, transfer_id: bytes, material: bytes, key_bits: int = 256) -> None:
        keys = self.links[0].pick_hop_keys(len(material))
        actions = self.site(0).start(
            transfer_id, self.names, key_bits, material, keys, now=self.now
        )
        self.run(self.names[0], actions)

    def run(self, origin: str, actions: list[RelayAction]) -> None:
        """Carry every action to its site until nothing is left to send."""
        queue = [(origin, action) for action in actions]
        while queue:
            at, action = queue.pop(0)
            self.log.append((at, action))
            queue += [(site, a) for site, a in self._step(at, action)]

    def _step(self, at: str, action: RelayAction) -> list[tuple[str, RelayAction]]:
        index = self.names.index(at)
        if isinstance(action, SendRelayKeys):
            body = self._wire(index, "keys", action.body)
            return [] if body is None else self.deliver_keys(index + 1, body)
        if isinstance(action, SendRelayAck):
            body = self._wire(index - 1, "ack", action.body)
            if body is None:
                return []
            return [(action.peer, a) for a in self.deliver_ack(index - 1, body)]
        if isinstance(action, NextHopNeeded):
            if index in self.withheld:
                return []
            keys = self.links[index].pick_hop_keys(action.material_size)
            return [(at, a) for a in self.sites[at].forward(action.transfer_id, keys, now=self.now)]
        assert isinstance(action, MaterialDelivered | HopAcked | TransferAbandoned)
        return []

    def _wire(self, hop: int, kind: str, body: bytes) -> bytes | None:
        return body if self.tamper is None else self.tamper(hop, kind, body)

    def deliver_keys(self, receiver: int, body: bytes) -> list[tuple[str, RelayAction]]:
        """A RELAY_KEYS body arrives at site ``receiver`` from the one before it."""
        site, sender, link = self.site(receiver), self.names[receiver - 1], self.links[receiver - 1]
        frame = decode_relay_keys(body)
        site.admit(frame, sender, now=self.now)
        actions = site.receive(frame, sender, link.fetch(frame.header), self.now)
        held = site.held_material(frame.header.transfer_id)
        if held is not None:
            self.relay_views.setdefault(site.site_id, []).append(held)
        return [(site.site_id, a) for a in actions]

    def deliver_ack(self, receiver: int, body: bytes) -> list[RelayAction]:
        """A RELAY_ACK body arrives at site ``receiver`` from the one after it."""
        sender = self.names[receiver + 1]
        return self.site(receiver).receive_ack(decode_relay_ack(body), sender, self.now)

    def actions_of(self, kind: type) -> list[tuple[str, RelayAction]]:
        return [(at, a) for at, a in self.log if isinstance(a, kind)]

    def sent_bodies(self, kind: type) -> list[tuple[str, bytes]]:
        """Every body of ``kind`` (SendRelayKeys or SendRelayAck) in order, by sender."""
        return [(at, a.body) for at, a in self.actions_of(kind)]
