"""Two ``LinkAgreement`` objects, each over its own real SQLite store, joined by an in-memory
wire with a simulated clock: what one sends the other receives (through the encodings),
unless the test drops, repeats or reorders it. No sockets and no real time: the clock only
moves when the test says so, so what a test measures is protocol behaviour, not speed."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from qkdd.crypto import PqcBackend
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link_params import LinkParameters
from qkdd.peer.agreement import LinkAgreement
from qkdd.peer.agreement_messages import LinkMessage, decode_message

SAES = {"site-a": "sae-a", "site-b": "sae-b"}


def params(local: str, peer: str, pool_size: int = 4, buffer_keys: int = 4096) -> LinkParameters:
    link = LinkParameters(
        local, peer, frozenset({SAES[local]}), frozenset({SAES[peer]}), 256, pool_size
    )
    # The size of the QKD buffer, where the link knows it (a full buffer stops the device).
    if hasattr(link, "qkd_buffer_keys"):
        link = dataclasses.replace(link, qkd_buffer_keys=buffer_keys)
    return link


def qkd_keys(count: int) -> list[StoredQkdKey]:
    return [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(count)]


# Decides what happens to one message on the wire: [] drops it, [m, m] repeats it.
Fate = Callable[[LinkMessage], list[LinkMessage]]


@dataclass
class LinkPair:
    """Site A (the link master) and site B (the slave), one session at a time."""

    a: KeyStore
    b: KeyStore
    backend: PqcBackend
    pool_size: int = 4
    buffer_keys: int = 4096
    now: float = 0.0
    session: int = 0
    to_a: list[LinkMessage] = field(default_factory=list)
    to_b: list[LinkMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.new_session()

    def new_session(self) -> None:
        """Both daemons start a new session (what was on the wire is lost)."""
        self.session += 1
        session_id = self.session.to_bytes(32, "big")
        self.master = LinkAgreement(
            params("site-a", "site-b", self.pool_size, self.buffer_keys),
            store=self.a,
            backend=self.backend,
            session_id=session_id,
        )
        self.slave = LinkAgreement(
            params("site-b", "site-a", self.pool_size, self.buffer_keys),
            store=self.b,
            backend=self.backend,
            session_id=session_id,
        )
        # The agreements start their clocks at the first poll or message.
        self.to_b = list(self.master.start())
        self.to_a = list(self.slave.start())

    def step(self, fate_to_a: Fate | None = None, fate_to_b: Fate | None = None) -> int:
        """Poll both sides and deliver what is on the wire once; returns messages moved."""
        self.to_b += self.master.poll(self.now)
        self.to_a += self.slave.poll(self.now)
        moved = 0
        to_a, self.to_a = self.to_a, []
        for message in to_a:
            for m in fate_to_a(message) if fate_to_a else [message]:
                self.to_b += self.master.on_message(decode_message(m.encode()), self.now)
                moved += 1
        to_b, self.to_b = self.to_b, []
        for message in to_b:
            for m in fate_to_b(message) if fate_to_b else [message]:
                self.to_a += self.slave.on_message(decode_message(m.encode()), self.now)
                moved += 1
        return moved

    def feed(self, keys: list[StoredQkdKey], *, only: str | None = None) -> None:
        """Keys from the devices: to both sites, or ``only`` to "a" or "b"."""
        if only != "b":
            self.a.store_qkd_keys("site-b", keys)
        if only != "a":
            self.b.store_qkd_keys("site-a", keys)

    def ready(self) -> tuple[int, int]:
        """Keys ready in each site's own pool (A's app sends to B, B's app to A)."""
        return self.a.ready_count("sae-a", "sae-b"), self.b.ready_count("sae-b", "sae-a")


def pump_until_quiet(
    master: LinkAgreement,
    slave: LinkAgreement,
    *,
    to_master: list[LinkMessage],
    to_slave: list[LinkMessage],
    rounds: int,
    now: float = 0.0,
    drop: Callable[[LinkMessage], bool] | None = None,
) -> None:
    """Poll both sides and deliver messages both ways (through their encodings) until
    nothing moves, at most ``rounds`` times; ``drop`` filters messages off the wire."""
    for _ in range(rounds):
        to_slave += master.poll(now)
        to_master += slave.poll(now)
        if not to_master and not to_slave:
            break
        for message in to_master:
            if not (drop and drop(message)):
                to_slave += master.on_message(decode_message(message.encode()), now)
        to_master = []
        for message in to_slave:
            if not (drop and drop(message)):
                to_master += slave.on_message(decode_message(message.encode()), now)
        to_slave = []
