"""Property: whatever happens to the messages of a session (lost, repeated, swapped with the
next) and to the devices (keys delivered to one site only), across several sessions, no
key is ever ready at one site without the same key at the other, no QKD key goes into two
batches, and a clean session afterwards fills both pools again.

Two LinkAgreements over real SQLite stores (link_pair), a simulated clock; a session ends
when either side raises LinkError (as the I/O layer then closes the connection) or after
a drawn number of rounds."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from link_pair import LinkPair, qkd_keys

from qkdd.crypto.select import select_backend
from qkdd.keystore import KeyStore
from qkdd.link import LinkError
from qkdd.peer.messages import KeyBatch, LinkMessage

KEK = bytes(range(32))
FATES = ("deliver", "drop", "repeat", "swap")
POOL = 2


class Wire:
    """Applies a drawn fate to each message, in order; remembers every KEY_BATCH sent."""

    def __init__(self, fates: list[str]) -> None:
        self.fates = fates
        self.index = 0
        self.held: LinkMessage | None = None  # a message swapped with the next one
        self.batches: dict[int, tuple[str, ...]] = {}

    def __call__(self, message: LinkMessage) -> list[LinkMessage]:
        if isinstance(message, KeyBatch):
            ids = tuple(q for e in message.entries for q in e.qkd_key_ids)
            self.batches.setdefault(message.batch_id, ids)
        fate = self.fates[self.index % len(self.fates)] if self.fates else "deliver"
        self.index += 1
        out: list[LinkMessage] = []
        if fate == "swap" and self.held is None:
            self.held = message
            return out
        if fate == "drop":
            pass
        elif fate == "repeat":
            out += [message, message]
        else:
            out.append(message)
        if self.held is not None:
            out.append(self.held)
            self.held = None
        return out


def held_keys(store: KeyStore, master: str, slave: str) -> dict[str, tuple[str, bytes]]:
    """Every key of the pair the store holds: key ID -> (state, material)."""
    found = {}
    for key_id, size, sealed, state in store._db.execute(
        "SELECT key_id, size_bits, material, state FROM hybrid_keys"
        " WHERE master_sae=? AND slave_sae=?",
        (master, slave),
    ):
        material = store._open_hybrid(key_id, master, slave, size, sealed)
        assert material is not None
        found[key_id] = (state, material)
    return found


def assert_no_one_sided_keys(a: KeyStore, b: KeyStore) -> None:
    for master, slave, here, there in (
        ("sae-a", "sae-b", a, b),
        ("sae-b", "sae-a", b, a),
    ):
        mine, theirs = held_keys(here, master, slave), held_keys(there, master, slave)
        for key_id, (state, material) in mine.items():
            if state == "ready":
                assert key_id in theirs, f"{key_id} ready at the {master} site only"
                assert theirs[key_id][1] == material, f"{key_id} differs between the sites"


session_plan = st.tuples(
    st.lists(st.sampled_from(FATES), min_size=1, max_size=12),  # to A
    st.lists(st.sampled_from(FATES), min_size=1, max_size=12),  # to B
    st.integers(1, 40),  # rounds before the session ends on its own
    st.integers(0, 150),  # keys only A's device delivered (it restarted while B was down)
    st.integers(0, 150),  # keys only B's device delivered
    st.integers(0, 12),  # keys both got
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(session_plan, min_size=1, max_size=4))
def test_faulty_sessions_never_leave_a_key_at_one_site(plans) -> None:  # type: ignore[no-untyped-def]
    backend = select_backend("cryptography")
    with tempfile.TemporaryDirectory() as tmp:
        a, b = KeyStore(Path(tmp) / "a.db", KEK), KeyStore(Path(tmp) / "b.db", KEK)
        try:
            pair = LinkPair(a, b, backend, pool_size=POOL)
            batches: dict[int, tuple[str, ...]] = {}
            for to_a, to_b, rounds, only_a, only_b, both in plans:
                pair.feed(qkd_keys(only_a), only="a")
                pair.feed(qkd_keys(only_b), only="b")
                pair.feed(qkd_keys(both))
                wire_a, wire_b = Wire(to_a), Wire(to_b)
                try:
                    for _ in range(rounds):
                        pair.step(fate_to_a=wire_a, fate_to_b=wire_b)
                        pair.now += 1.0
                except LinkError:
                    pass  # the I/O layer would close the connection here
                for wire in (wire_a, wire_b):
                    for batch_id, ids in wire.batches.items():
                        assert batches.setdefault(batch_id, ids) == ids
                assert_no_one_sided_keys(a, b)
                pair.now += 1.0
                pair.new_session()
            # No QKD key went into two batches.
            used = [q for ids in batches.values() for q in ids]
            assert len(used) == len(set(used))
            # A clean session with fresh keys: both pools fill, and the sites agree.
            pair.feed(qkd_keys(4 * POOL + 4))
            for _ in range(400):
                if pair.ready() == (POOL, POOL):
                    break
                pair.step()
                pair.now += 0.1
            assert pair.ready() == (POOL, POOL)
            assert_no_one_sided_keys(a, b)
        finally:
            a.close()
            b.close()
