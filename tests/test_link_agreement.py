"""Key agreement between a link master and slave, sans-IO, each with its own real SQLite store."""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest
from link_pair import pump_until_quiet

from qkdd.keystore import StoredQkdKey
from qkdd.link_params import LinkError, LinkParameters
from qkdd.peer.agreement import QKD_KEY_WAIT_SECONDS, LinkAgreement
from qkdd.peer.agreement_messages import (
    BatchAck,
    BatchDecision,
    BatchPurpose,
    KeyBatch,
    PoolDemand,
    Resync,
)

SESSION = b"s" * 32


def params(local, peer, pool_size=4):
    saes = {"site-a": "sae-a", "site-b": "sae-b"}
    return LinkParameters(
        local, peer, frozenset({saes[local]}), frozenset({saes[peer]}), 256, pool_size
    )


def feed_qkd(stores, count, *, only=None):
    keys = [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(count)]
    a, b = stores
    if only != "b":
        a.store_qkd_keys("site-b", keys)
    if only != "a":
        b.store_qkd_keys("site-a", keys)
    return keys


def agreements(stores, backend, pool_size=4):
    a, b = stores
    master = LinkAgreement(
        params("site-a", "site-b", pool_size), store=a, backend=backend, session_id=SESSION
    )
    slave = LinkAgreement(
        params("site-b", "site-a", pool_size), store=b, backend=backend, session_id=SESSION
    )
    return master, slave


def pump(master, slave, now=0.0, rounds=20, drop=None):
    """Deliver messages both ways (through their encodings) until quiet; drop= filters."""
    to_master = [m for m in slave.start()] if not getattr(slave, "_started", False) else []
    slave._started = True
    pump_until_quiet(
        master, slave, to_master=to_master, to_slave=[], rounds=rounds, now=now, drop=drop
    )


def test_master_fills_both_directions_and_both_sides_hold_the_same_keys(stores, backend):
    a, b = stores
    feed_qkd(stores, 16)
    master, slave = agreements(stores, backend)
    pump(master, slave)
    assert a.ready_count("sae-a", "sae-b") == 4  # pool at A for keys A's app sends
    assert b.ready_count("sae-b", "sae-a") == 4  # pool at B, filled on B's demand
    keys_a = a.take_ready("sae-a", "sae-b", 4)
    keys_b = b.take_by_ids("sae-a", "sae-b", [k.key_id for k in keys_a])
    assert keys_b is not None
    assert [k.material for k in keys_a] == [k.material for k in keys_b]
    assert len({k.material for k in keys_a}) == 4
    # Handed out once: gone from both stores afterwards.
    assert b.take_by_ids("sae-a", "sae-b", [keys_a[0].key_id]) is None


def test_qkd_keys_are_consumed_once(stores, backend):
    a, b = stores
    keys = feed_qkd(stores, 8)
    master, slave = agreements(stores, backend, pool_size=2)
    pump(master, slave)
    # 2 keys each way and one authentication key consumed 5 of the 8 QKD keys.
    assert a.qkd_key_count("site-b") == b.qkd_key_count("site-a") == 3
    # A device re-sending a consumed key must not bring it back.
    assert a.store_qkd_keys("site-b", keys[:5]) == 0


def test_lost_ack_is_resolved_by_resync_without_one_sided_keys(stores, backend):
    a, b = stores
    feed_qkd(stores, 8)
    master, slave = agreements(stores, backend, pool_size=4)
    pump(master, slave, drop=lambda m: isinstance(m, BatchAck))
    # The slave holds a pending batch, the master too: nothing is deliverable anywhere.
    assert a.ready_count("sae-a", "sae-b") == 0 and b.ready_count("sae-b", "sae-a") == 0
    assert b.pending_batches("site-a") and a.pending_batches("site-b")
    # New session: RESYNC makes the master commit what the slave holds.
    master, slave = agreements(stores, backend, pool_size=4)
    pump(master, slave)
    assert not a.pending_batches("site-b") and not b.pending_batches("site-a")
    keys_a = a.take_ready("sae-a", "sae-b", 4)
    assert b.take_by_ids("sae-a", "sae-b", [k.key_id for k in keys_a]) is not None


def test_lost_batch_is_aborted_on_the_master(stores, backend):
    a, b = stores
    feed_qkd(stores, 16)
    master, slave = agreements(stores, backend, pool_size=4)
    pump(master, slave, drop=lambda m: isinstance(m, KeyBatch))
    assert a.pending_batches("site-b") and not b.pending_batches("site-a")
    master, slave = agreements(stores, backend, pool_size=4)
    pump(master, slave)
    assert not a.pending_batches("site-b")
    keys_a = a.take_ready("sae-a", "sae-b", 4)
    assert len(keys_a) == 4
    assert b.take_by_ids("sae-a", "sae-b", [k.key_id for k in keys_a]) is not None


def test_lost_decision_neither_loses_keys_nor_holds_up_the_slave(stores, backend):
    a, b = stores
    feed_qkd(stores, 16)
    master, slave = agreements(stores, backend, pool_size=4)
    pump(master, slave, drop=lambda m: isinstance(m, BatchDecision))
    assert b.pending_batches("site-a")  # every decision was lost
    assert b.ready_count("sae-b", "sae-a") == 0  # B's own pool waits for them
    keys_a = a.take_ready("sae-a", "sae-b", 4)  # the master committed on the ACKs
    # An application at B asking by ID gets them: only A can have told it the IDs.
    keys_b = b.take_by_ids("sae-a", "sae-b", [k.key_id for k in keys_a])
    assert [k.material for k in keys_b] == [k.material for k in keys_a]
    master, slave = agreements(stores, backend, pool_size=4)
    pump(master, slave)
    assert not b.pending_batches("site-a")  # RESYNC settled the rest
    assert b.ready_count("sae-b", "sae-a") == 4


def test_device_desync_quarantines_the_keys_and_delivers_nothing(stores, backend):
    a, b = stores
    feed_qkd(stores, 1, only="a")  # the slave's device never delivered this one
    master, slave = agreements(stores, backend, pool_size=4)
    pump(master, slave, now=0.0)
    assert a.ready_count("sae-a", "sae-b") == 0
    pump(master, slave, now=QKD_KEY_WAIT_SECONDS + 1)  # the slave gives up waiting
    assert a.ready_count("sae-a", "sae-b") == 0
    assert not a.pending_batches("site-b") and not b.pending_batches("site-a")
    assert a.qkd_key_count("site-b") == 0  # quarantined: never used again
    # The link recovers by itself once both devices agree again.
    feed_qkd(stores, 16)
    pump(master, slave, now=QKD_KEY_WAIT_SECONDS + 2)
    assert a.ready_count("sae-a", "sae-b") == 4
    assert a.newest_ready_auth_key("site-b") is not None


def test_slave_rejects_a_batch_for_an_unconfigured_sae_pair(stores, backend):
    a, b = stores
    feed_qkd(stores, 8)
    master, slave = agreements(stores, backend)
    sent = [out for m in slave.start() for out in master.on_message(m, 0.0)]
    batch = next(
        m for m in sent if isinstance(m, KeyBatch) and m.purpose == BatchPurpose.APPLICATION_KEYS
    )
    forged = dataclasses.replace(batch, master_sae_id="sae-x")
    reply = slave.on_message(forged, 0.0)
    assert isinstance(reply[0], BatchAck) and not reply[0].accepted
    assert "not configured" in reply[0].reason


def test_master_refuses_messages_before_resync(stores, backend):
    master, _ = agreements(stores, backend)
    with pytest.raises(LinkError, match="before RESYNC"):
        master.on_message(PoolDemand(()), 0.0)


def test_ack_for_unknown_batch_is_a_protocol_error(stores, backend):
    master, _ = agreements(stores, backend)
    master.on_message(Resync(()), 0.0)
    with pytest.raises(LinkError, match="not in flight"):
        master.on_message(BatchAck(99, True), 0.0)


def test_each_session_rotates_the_authentication_key(stores, backend):
    """The first batch of a session makes a new PSK; committing it erases the old one."""
    a, b = stores
    feed_qkd(stores, 32)
    assert a.bootstrap_allowed("site-b") and b.bootstrap_allowed("site-a")
    master, slave = agreements(stores, backend, pool_size=1)
    pump(master, slave)
    first = a.newest_ready_auth_key("site-b")
    assert first is not None
    assert b.auth_key("site-a", first.key_id).material == first.material
    # The chain is established: a signature bootstrap now needs the operator.
    assert not a.bootstrap_allowed("site-b") and not b.bootstrap_allowed("site-a")
    master, slave = agreements(stores, backend, pool_size=1)
    pump(master, slave)
    second = a.newest_ready_auth_key("site-b")
    assert second.key_id != first.key_id and second.material != first.material
    assert a.auth_key("site-b", first.key_id) is None  # erased on both sides
    assert b.auth_key("site-a", first.key_id) is None
    b.allow_bootstrap("site-a")
    assert b.bootstrap_allowed("site-a")


def test_lost_decision_on_the_psk_keeps_both_sides_able_to_authenticate(stores, backend):
    """The slave keeps the old PSK while the new one is pending; the master's next
    handshake with the new one proves it, and the slave commits it then."""
    a, b = stores
    feed_qkd(stores, 16)
    master, slave = agreements(stores, backend, pool_size=1)
    pump(master, slave)
    old = a.newest_ready_auth_key("site-b")
    master, slave = agreements(stores, backend, pool_size=1)
    pump(master, slave, drop=lambda m: isinstance(m, BatchDecision))
    new = a.newest_ready_auth_key("site-b")
    assert new.key_id != old.key_id
    slave_copy = b.auth_key("site-a", new.key_id)
    assert slave_copy is not None and not slave_copy.ready
    assert b.auth_key("site-a", old.key_id).ready  # still usable
    b.auth_key_proven("site-a", new.key_id)  # what a handshake with `new` does
    assert b.auth_key("site-a", new.key_id).ready
    assert b.auth_key("site-a", old.key_id) is None


def test_orphaned_qkd_keys_on_either_side_are_dropped_and_buffers_line_up(stores, backend):
    """Keys one device delivered that the other side lost (e.g. its state was wiped) come
    first in one buffer only; the horizon and the slave's own check drop them at once,
    without a batch waiting for keys that will never come."""
    a, b = stores
    feed_qkd(stores, 5, only="a")  # master-only orphans
    feed_qkd(stores, 3, only="b")  # slave-only orphans
    feed_qkd(stores, 16)
    master, slave = agreements(stores, backend, pool_size=2)
    pump(master, slave, now=0.0)  # no time passes: nothing may wait for missing keys
    assert a.ready_count("sae-a", "sae-b") == 2 and b.ready_count("sae-b", "sae-a") == 2
    # 16 common keys, 5 used (2 + 2 + 1 authentication key): 11 left on each side.
    assert a.qkd_key_count("site-b") == b.qkd_key_count("site-a") == 11


def test_slave_gives_up_when_the_decision_never_comes(stores, backend):
    from qkdd.link_params import LinkError
    from qkdd.peer.agreement import BATCH_REPLY_TIMEOUT

    feed_qkd(stores, 8)
    master, slave = agreements(stores, backend)
    for message in master.start():
        slave.on_message(message, 0.0)
    sent = [out for m in slave.start() for out in master.on_message(m, 0.0)]
    batch = next(m for m in sent if isinstance(m, KeyBatch))
    replies = slave.on_message(batch, 0.0)
    assert isinstance(replies[0], BatchAck) and replies[0].accepted  # ... the decision is lost
    slave.poll(BATCH_REPLY_TIMEOUT - 1)  # still within the deadline
    with pytest.raises(LinkError, match="no BATCH_DECISION"):
        slave.poll(BATCH_REPLY_TIMEOUT + 1)


def test_the_share_of_qkd_material_for_authentication_is_configurable(stores, backend):
    import dataclasses

    a, b = stores
    feed_qkd(stores, 16)
    master, slave = agreements(stores, backend, pool_size=1)
    master = LinkAgreement(
        dataclasses.replace(master.params, auth_key_bits=512),
        store=a,
        backend=backend,
        session_id=SESSION,
    )
    pump(master, slave)
    key = a.newest_ready_auth_key("site-b")
    assert len(key.material) == 64  # two 256-bit QKD keys set aside for it
    assert b.auth_key("site-a", key.key_id).material == key.material


def test_a_peer_whose_state_was_lost_while_our_buffer_was_full_is_caught_up(stores, backend):
    """Our buffer holds only keys the peer had before it lost its state; the peer's oldest
    keys have not reached us yet. The horizon tells us our whole buffer is orphaned, so it
    is dropped and room is made for the keys both sides will have."""
    a, b = stores
    a.check_peer_store("site-b", b"\x01" * 16)  # the peer's store, before it was lost
    feed_qkd(stores, 8, only="a")  # the peer's copies were lost with its store
    fresh = feed_qkd(stores, 4, only="b")  # the peer already has newer keys; we do not yet
    master, slave = agreements(stores, backend, pool_size=2)
    pump(master, slave, now=0.0)
    assert a.qkd_key_count("site-b") == 0  # all orphans dropped at once, without waiting
    assert b.qkd_key_count("site-a") == 4  # the peer keeps what we are about to receive
    a.store_qkd_keys("site-b", fresh)
    pump(master, slave, now=1.0)
    assert a.newest_ready_auth_key("site-b") is not None
    assert a.ready_count("sae-a", "sae-b") + b.ready_count("sae-b", "sae-a") >= 2


def test_without_a_state_loss_unknown_horizon_keys_drop_nothing(stores, backend):
    """The peer is merely behind (its device slower): nothing of ours may be dropped."""
    a, b = stores
    keys = feed_qkd(stores, 6, only="a")
    b.store_qkd_keys("site-a", keys[3:4])  # the peer has one later key only
    assert a.align_to_peer_horizon("site-b", [keys[3].key_id]) == 3  # ours before it
    assert a.align_to_peer_horizon("site-b", [str(uuid.uuid4())]) == 0  # unknown: kept
    assert a.qkd_key_count("site-b") == 3


def test_pads_are_raw_qkd_material_made_after_the_key_pools_in_both_directions(stores, backend):
    a, b = stores
    qkd = feed_qkd(stores, 1 + 2 * 2 + 2 * 2 * 32)  # auth key, two pools of 2, 2x2 pads
    pad_params = [
        dataclasses.replace(params(local, peer, 2), pad_keys=2)
        for local, peer in (("site-a", "site-b"), ("site-b", "site-a"))
    ]
    master, slave = (
        LinkAgreement(p, store=s, backend=backend, session_id=SESSION)
        for p, s in zip(pad_params, stores, strict=True)
    )
    pump(master, slave, rounds=40)
    assert a.ready_count("sae-a", "sae-b") == 2 and b.ready_count("sae-b", "sae-a") == 2
    assert a.pad_ready_count("sae-a", "sae-b") == 2  # A's app sends with these
    assert b.pad_ready_count("sae-b", "sae-a") == 2  # made on B's PAD_DEMAND
    assert a.pad_ready_bytes("sae-a", "sae-b") == 2 * 1024
    pads_a = a.take_pads("sae-a", "sae-b", 1500)  # two pads cover 1500 bytes
    assert len(pads_a) == 2
    with b.transaction() as db:
        pads_b = b.take_pads_in(db, [p.key_id for p in pads_a], "sae-a", "sae-b")
    assert pads_b is not None and [p.material for p in pads_b] == [p.material for p in pads_a]
    # A pad is the QKD keys themselves, in stream order: no KDF, no ML-KEM input.
    by_id = {k.key_id: k.material for k in qkd}
    assert pads_a[0].material in b"".join(by_id[k.key_id] for k in qkd)
    assert a.take_pads("sae-a", "sae-b", 1) == []  # each pad once
    assert a.take_pads("sae-b", "sae-a", 10**6) == []  # short stock: nothing taken


def test_slave_rejects_oversized_pads(stores, backend):
    a, b = stores
    feed_qkd(stores, 40)
    master, slave = agreements(stores, backend, pool_size=0)
    pump(master, slave)
    batch = KeyBatch(
        999,
        slave._taker._offer_counter,
        BatchPurpose.PADS,
        bytes(1088),
        "sae-a",
        "sae-b",
        8192 + 256,
        1,
        uuid.uuid4().bytes,
        1,
        bytes(32),
    )
    (ack, _offer) = slave.on_message(batch, 0.0)
    assert not ack.accepted and "has 8192 bits, not 8448" in ack.reason
