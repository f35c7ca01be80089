"""Who may hold a responder handshake slot before authenticating (sans-IO: no sockets, no
clock; the I/O layer says when a connection arrives, when its HELLO was accepted, and when
it ends).

Theory of operation. A TCP connection that has not yet authenticated costs the responder
a task, a buffer of at most one handshake frame and, once a HELLO is accepted, one ML-KEM
encapsulation. TCP's own handshake already proves the source address, so WireGuard's
cookie round trip (which proves an address over UDP) would add nothing here; what limits
a stranger is how many slots it can hold, for how long, and whether it can crowd out the
peer we wait for. So:

- strangers share ``total`` slots, at most ``per_address`` per source (IPv6 sources count
  per /64, since one host usually holds a whole /64);
- each configured peer address (every peer dials us) has ``reserved`` slots of its own,
  which no stranger can take: a flood from other addresses never reaches them;
- when the strangers' slots are all taken, a newcomer from a source holding fewer slots
  than the busiest source takes the place of that source's oldest connection that has not
  yet sent an acceptable HELLO (such a connection is ``evicted``). A peer arriving from an
  address we do not know (NAT, a second interface) still gets in; it sends its HELLO at
  once, after which its slot is no longer evictable.

The I/O layer also bounds time: a HELLO must arrive within HELLO_TIMEOUT of connecting, the
whole handshake within HANDSHAKE_TIMEOUT (see qkdd.peering and docs/protocol.md §3.1). The
default slot counts and both timers are in qkdd.constants.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Final

from qkdd.constants import (
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_HANDSHAKES_PER_ADDRESS,
    RESERVED_HANDSHAKES_PER_PEER_ADDRESS,
)

_IPV6_GROUP_PREFIX: Final = 64


def normalise_address(address: str) -> str:
    """The canonical text of an IP address; an IPv4-mapped IPv6 address (a dual-stack
    listener) becomes the IPv4 address. Anything else is returned as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _source_group(address: str) -> str:
    """What the per-address limit counts: the address, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, _IPV6_GROUP_PREFIX), strict=False))
    return str(ip)


class HandshakeSlot:
    """One admitted connection's place. ``evict`` is called (once) if a newcomer takes it."""

    def __init__(
        self, address: str, group: str, reserved: bool, order: int, evict: Callable[[], None]
    ) -> None:
        self.address = address
        self.group = group
        self.reserved = reserved
        self.order = order  # admission order: lower is older
        self.hello_accepted = False
        self.evicted = False
        self.held = True  # counted against a limit until released or evicted
        self._evict = evict

    def __repr__(self) -> str:
        state = "evicted" if self.evicted else "hello" if self.hello_accepted else "waiting"
        return f"<HandshakeSlot {self.address} {'reserved' if self.reserved else 'shared'} {state}>"


class HandshakeLimiter:
    """The responder's handshake slots: strangers' shared ones and the peers' reserved ones."""

    def __init__(
        self,
        *,
        total: int = MAX_PENDING_HANDSHAKES,
        per_address: int = MAX_PENDING_HANDSHAKES_PER_ADDRESS,
        reserved: int = RESERVED_HANDSHAKES_PER_PEER_ADDRESS,
        peer_addresses: Iterable[str] = (),
    ) -> None:
        self._total, self._per_address, self._reserved = total, per_address, reserved
        self.peer_addresses = frozenset(normalise_address(a) for a in peer_addresses)
        self._shared: list[HandshakeSlot] = []
        self._reserved_held: dict[str, int] = {}
        self._admitted = 0

    @property
    def in_progress(self) -> int:
        return len(self._shared) + sum(self._reserved_held.values())

    def admit(self, address: str, evict: Callable[[], None]) -> HandshakeSlot | None:
        """A slot for a new connection from ``address``, or None to refuse it at once.
        May evict an older stranger's connection (its ``evict`` is called first)."""
        address = normalise_address(address)
        self._admitted += 1
        if address in self.peer_addresses:
            held = self._reserved_held.get(address, 0)
            if held < self._reserved:
                self._reserved_held[address] = held + 1
                return HandshakeSlot(address, address, True, self._admitted, evict)
            # A peer address over its reservation competes like anyone else.
        group = _source_group(address)
        held = sum(1 for slot in self._shared if slot.group == group)
        if held >= self._per_address:
            return None
        if len(self._shared) >= self._total:
            victim = self._victim(held)
            if victim is None:
                return None
            self._shared.remove(victim)
            victim.held, victim.evicted = False, True
            victim._evict()
        slot = HandshakeSlot(address, group, False, self._admitted, evict)
        self._shared.append(slot)
        return slot

    def _victim(self, newcomer_holds: int) -> HandshakeSlot | None:
        """The oldest connection still waiting for its HELLO, from the source holding the
        most slots, if that source holds more than the newcomer's."""
        held: dict[str, int] = {}
        for slot in self._shared:
            held[slot.group] = held.get(slot.group, 0) + 1
        waiting = [
            s for s in self._shared if not s.hello_accepted and held[s.group] > newcomer_holds
        ]
        if not waiting:
            return None
        return min(waiting, key=lambda s: (-held[s.group], s.order))

    def hello_accepted(self, slot: HandshakeSlot) -> None:
        """The connection sent a HELLO that passed every check made before key exchange:
        from now on it keeps its slot until its handshake ends."""
        slot.hello_accepted = True

    def release(self, slot: HandshakeSlot) -> None:
        """The connection's handshake ended (however). Releasing twice, or after an
        eviction, does nothing."""
        if not slot.held:
            return
        slot.held = False
        if slot.reserved:
            left = self._reserved_held[slot.address] - 1
            if left:
                self._reserved_held[slot.address] = left
            else:
                del self._reserved_held[slot.address]
        else:
            self._shared.remove(slot)
