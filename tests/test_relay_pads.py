"""Relay pads: one-time pads each direction of a direct link keeps for sealing relayed QKD
material per hop (docs/protocol.md §5), for the pseudo pair relay@local -> relay@peer.
Two ``LinkAgreement`` objects over real SQLite stores; they flow only where both ends
relay, and a mismatch neither breaks the session nor spends QKD material."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from link_pair import params, pump_until_quiet, qkd_keys

from qkdd.keystore import KeyStore
from qkdd.link_params import LinkError, LinkParameters, relay_sae
from qkdd.peer.agreement import LinkAgreement
from qkdd.peer.agreement_messages import (
    BatchAck,
    BatchPurpose,
    KeyBatch,
    LinkMessage,
    PadDemand,
    Resync,
)
from qkdd.peer.batching import PAD_BITS_MAX

SESSION = b"r" * 32
RELAY_A = (relay_sae("site-a"), relay_sae("site-b"))  # the master's relay direction
RELAY_B = (relay_sae("site-b"), relay_sae("site-a"))  # the slave's
QKD_PER_PAD = PAD_BITS_MAX // 256


def link_params(local: str, peer: str, *, relay: int, pads: int = 0) -> LinkParameters:
    return dataclasses.replace(params(local, peer, 2), relay_pads=relay, pad_keys=pads)


class Link:
    """A master (site A) and a slave (site B) with their own relay settings; every
    message on the wire is kept in ``wire``."""

    def __init__(self, stores, backend, *, relay_a: int, relay_b: int, pads_b: int = 0):
        self.a, self.b = stores
        self.master = LinkAgreement(
            link_params("site-a", "site-b", relay=relay_a),
            store=self.a,
            backend=backend,
            session_id=SESSION,
        )
        self.slave = LinkAgreement(
            link_params("site-b", "site-a", relay=relay_b, pads=pads_b),
            store=self.b,
            backend=backend,
            session_id=SESSION,
        )
        self.wire: list[LinkMessage] = []
        self._to_master = list(self.slave.start())

    def feed(self, count: int) -> None:
        keys = qkd_keys(count)
        self.a.store_qkd_keys("site-b", keys)
        self.b.store_qkd_keys("site-a", keys)

    def pump(self) -> None:
        def watch(message: LinkMessage) -> bool:
            self.wire.append(message)
            return False

        to_master, self._to_master = self._to_master, []
        pump_until_quiet(
            self.master, self.slave, to_master=to_master, to_slave=[], rounds=60, drop=watch
        )

    def batches(self) -> list[KeyBatch]:
        return [m for m in self.wire if isinstance(m, KeyBatch)]

    def rejections(self) -> list[BatchAck]:
        return [m for m in self.wire if isinstance(m, BatchAck) and not m.accepted]


def relay_pad_counts(a: KeyStore, b: KeyStore) -> list[int]:
    return [store.pad_ready_count(*pair) for store in (a, b) for pair in (RELAY_A, RELAY_B)]


def use_relay_pads(a: KeyStore, b: KeyStore, pair: tuple[str, str], count: int) -> None:
    """What a hop's seal and open do with relay pads: the oldest at the sender, the same
    by ID at the receiver, each erased; both ends must hold identical material."""
    sender, receiver = (a, b) if pair == RELAY_A else (b, a)
    sent = sender.take_pads(*pair, count * PAD_BITS_MAX // 8)
    assert len(sent) == count
    with receiver.transaction() as db:
        got = receiver.take_pads_in(db, [p.key_id for p in sent], *pair)
    assert got is not None
    assert [p.material for p in got] == [p.material for p in sent]


def test_relay_pads_fill_both_directions_with_the_same_material_at_both_ends(stores, backend):
    a, b = stores
    link = Link(stores, backend, relay_a=2, relay_b=2)
    link.feed(1 + 2 * 2 + 2 * 2 * QKD_PER_PAD)  # auth key, two pools of 2, 2x2 relay pads
    link.pump()
    assert relay_pad_counts(a, b) == [2, 2, 2, 2]
    assert not link.rejections()
    assert a.qkd_key_count("site-b") == b.qkd_key_count("site-a") == 0
    use_relay_pads(a, b, RELAY_A, 2)
    use_relay_pads(a, b, RELAY_B, 2)
    assert relay_pad_counts(a, b) == [0, 0, 0, 0]
    # Never mixed up with the application's one-time pads.
    assert a.pad_ready_count("sae-a", "sae-b") == b.pad_ready_count("sae-b", "sae-a") == 0


def test_application_pools_fill_before_relay_pads(stores, backend):
    a, b = stores
    link = Link(stores, backend, relay_a=1, relay_b=1)
    link.feed(1 + 2 * 2)  # enough for the authentication key and both pools only
    link.pump()
    assert a.ready_count("sae-a", "sae-b") == 2 and b.ready_count("sae-b", "sae-a") == 2
    assert relay_pad_counts(a, b) == [0, 0, 0, 0]
    link.feed(2 * QKD_PER_PAD)
    link.pump()
    assert relay_pad_counts(a, b) == [1, 1, 1, 1]
    # Relay pads and application keys both used up: the fresh QKD keys refill the
    # application pools, and no relay pad waits in front of them for a whole pad's worth.
    use_relay_pads(a, b, RELAY_A, 1)
    use_relay_pads(a, b, RELAY_B, 1)
    a.take_ready("sae-a", "sae-b", 2)
    b.take_ready("sae-b", "sae-a", 2)
    link.feed(2 * 2)
    link.pump()
    assert a.ready_count("sae-a", "sae-b") == 2 and b.ready_count("sae-b", "sae-a") == 2
    assert relay_pad_counts(a, b) == [0, 0, 0, 0]
    link.feed(2 * QKD_PER_PAD)
    link.pump()
    assert relay_pad_counts(a, b) == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("relay_a", "relay_b", "pads_b"),
    [(2, 0, 0), (2, 0, 1), (0, 2, 0), (0, 2, 1)],
    ids=["master-only", "master-only-slave-pads", "slave-only", "slave-only-slave-pads"],
)
def test_relaying_at_one_end_only_makes_no_relay_pads_and_keeps_the_link_up(
    stores, backend, relay_a, relay_b, pads_b
):
    a, b = stores
    link = Link(stores, backend, relay_a=relay_a, relay_b=relay_b, pads_b=pads_b)
    fed = 1 + 2 * 2 + pads_b * QKD_PER_PAD + 4 * QKD_PER_PAD
    link.feed(fed)
    link.pump()  # a LinkError would end the session: the pump would raise
    assert a.ready_count("sae-a", "sae-b") == 2 and b.ready_count("sae-b", "sae-a") == 2
    assert b.pad_ready_count("sae-b", "sae-a") == pads_b  # the slave's own pads still flow
    # Application keys keep flowing in the same session.
    a.take_ready("sae-a", "sae-b", 2)
    b.take_ready("sae-b", "sae-a", 2)
    link.feed(2 * 2)
    link.pump()
    assert a.ready_count("sae-a", "sae-b") == 2 and b.ready_count("sae-b", "sae-a") == 2
    # No relay pad batch was made, none rejected, no QKD material spent on them.
    assert relay_pad_counts(a, b) == [0, 0, 0, 0]
    assert not [m for m in link.batches() if m.master_sae_id.startswith("relay@")]
    assert not link.rejections()
    left = fed + 2 * 2 - (1 + 2 * 2 * 2 + pads_b * QKD_PER_PAD)
    assert a.qkd_key_count("site-b") == b.qkd_key_count("site-a") == left
    # A relaying slave told the master so; a slave that does not relay did not.
    listed = {(s, r) for m in link.wire if isinstance(m, PadDemand) for s, r, _wanted in m.wanted}
    assert (RELAY_B in listed) == bool(relay_b)


def test_a_master_that_does_not_relay_ignores_the_relay_pair_and_says_so_once(
    stores, backend, caplog
):
    link = Link(stores, backend, relay_a=0, relay_b=2)
    link.master.on_message(Resync(()), 0.0)
    caplog.set_level(logging.INFO, logger="qkdd.link")
    for _ in range(3):
        assert link.master.on_message(PadDemand(((*RELAY_B, 2),)), 0.0) == []
    assert sum("event=relay_pads_off" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    "pair",
    [RELAY_A, (relay_sae("site-b"), relay_sae("site-x")), ("sae-b", relay_sae("site-a"))],
    ids=["wrong-direction", "other-site", "mixed"],
)
def test_pad_demand_for_any_other_pair_is_still_a_protocol_error(stores, backend, pair):
    link = Link(stores, backend, relay_a=2, relay_b=2)
    link.master.on_message(Resync(()), 0.0)
    with pytest.raises(LinkError, match="PAD_DEMAND for a pair we do not serve"):
        link.master.on_message(PadDemand(((*pair, 1),)), 0.0)


def _first_app_batch(link: Link) -> KeyBatch:
    link.feed(8)
    opening, link._to_master = link._to_master, []  # the slave's RESYNC and offers
    sent = [out for m in opening for out in link.master.on_message(m, 0.0)]
    return next(
        m for m in sent if isinstance(m, KeyBatch) and m.purpose == BatchPurpose.APPLICATION_KEYS
    )


@pytest.mark.parametrize("pair", [RELAY_A, RELAY_B], ids=["master-direction", "slave-direction"])
def test_slave_rejects_application_keys_for_a_relay_pair(stores, backend, pair):
    link = Link(stores, backend, relay_a=2, relay_b=2)
    forged = dataclasses.replace(
        _first_app_batch(link), master_sae_id=pair[0], slave_sae_id=pair[1]
    )
    reply = link.slave.on_message(forged, 0.0)
    assert isinstance(reply[0], BatchAck) and not reply[0].accepted
    assert "not configured" in reply[0].reason


def test_slave_that_does_not_relay_rejects_relay_pads(stores, backend):
    link = Link(stores, backend, relay_a=2, relay_b=0)
    forged = dataclasses.replace(
        _first_app_batch(link),
        purpose=BatchPurpose.PADS,
        size_bits=PAD_BITS_MAX,
        master_sae_id=RELAY_A[0],
        slave_sae_id=RELAY_A[1],
    )
    reply = link.slave.on_message(forged, 0.0)
    assert isinstance(reply[0], BatchAck) and not reply[0].accepted
    assert "not configured" in reply[0].reason


def test_relay_pads_need_site_ids_that_fit_the_wire_with_the_prefix():
    fits = "s" * (64 - len("relay@"))
    base = link_params("site-a", "site-b", relay=0)
    dataclasses.replace(base, peer_site_id=fits, relay_pads=1)
    dataclasses.replace(base, peer_site_id=fits + "x")  # without relaying: any site ID
    with pytest.raises(ValueError, match="at most 58 characters"):
        dataclasses.replace(base, peer_site_id=fits + "x", relay_pads=1)
