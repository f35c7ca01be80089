"""Batches as the unit of key agreement (peer protocol v3): thousands of keys per batch
named by a run of QKD keys, several batches in flight, and the slave's checks of the run.
Two ``LinkAgreement``s over real SQLite stores, messages through their encodings."""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest
from link_pair import pump_until_quiet

from qkdd.keystore import StoredQkdKey
from qkdd.link_params import LinkParameters
from qkdd.peer.agreement import WINDOW, LinkAgreement
from qkdd.peer.agreement_messages import BatchAck, KemOffer, KeyBatch, decode_message

SESSION = b"v" * 32


def params(local: str, peer: str, pool_size: int) -> LinkParameters:
    saes = {"site-a": "sae-a", "site-b": "sae-b"}
    return LinkParameters(
        local,
        peer,
        frozenset({saes[local]}),
        frozenset({saes[peer]}),
        256,
        pool_size,
        qkd_buffer_keys=1_000_000,
    )


def feed(stores, count: int, *, only: str | None = None) -> list[StoredQkdKey]:
    keys = [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(count)]
    a, b = stores
    if only != "b":
        a.store_qkd_keys("site-b", keys)
    if only != "a":
        b.store_qkd_keys("site-a", keys)
    return keys


def pair(stores, backend, pool_size: int, batch_keys: int = 4096, list_ids: bool = False):
    a, b = stores
    master = LinkAgreement(
        params("site-a", "site-b", pool_size),
        store=a,
        backend=backend,
        session_id=SESSION,
        batch_keys=batch_keys,
        list_qkd_ids=list_ids,
    )
    slave = LinkAgreement(
        params("site-b", "site-a", pool_size),
        store=b,
        backend=backend,
        session_id=SESSION,
        batch_keys=batch_keys,
    )
    return master, slave


def open_session(master, slave):
    """Both start; the master reads everything the slave sent first (RESYNC, offers)."""
    out = list(master.start(0.0))
    for message in slave.start(0.0):
        out += master.on_message(decode_message(message.encode()), 0.0)
    return out


def test_thousands_of_keys_in_one_batch_match_at_both_sites(stores, backend):
    a, b = stores
    feed(stores, 3000)
    master, slave = pair(stores, backend, pool_size=2000, batch_keys=2000)
    pump_until_quiet(
        master, slave, to_master=list(slave.start(0.0)), to_slave=list(master.start(0.0)), rounds=20
    )
    assert a.ready_count("sae-a", "sae-b") == 2000
    assert b.ready_count("sae-b", "sae-a") == 999  # 3000 - the auth key - 2000 for A's pool
    keys_a = a.take_ready("sae-a", "sae-b", 2000)
    keys_b = b.take_by_ids("sae-a", "sae-b", [k.key_id for k in keys_a])
    assert keys_b is not None
    assert [k.material for k in keys_b] == [k.material for k in keys_a]
    assert len({k.key_id for k in keys_a}) == 2000
    assert len({k.material for k in keys_a}) == 2000


def test_the_master_keeps_a_window_of_batches_in_flight(stores, backend):
    feed(stores, 64)
    master, slave = pair(stores, backend, pool_size=1000, batch_keys=8)
    out = open_session(master, slave)
    batches = [m for m in out if isinstance(m, KeyBatch)]
    # The authentication key and then whole batches, up to the window, before any ACK.
    assert len(batches) == WINDOW
    assert [b.count for b in batches] == [1, 8, 8, 8]
    assert len({b.offer_id for b in batches}) == WINDOW
    # The runs follow one another in the buffer without overlap.
    assert len({b.qkd_first_key_id for b in batches}) == WINDOW


def test_no_short_batch_while_others_are_in_flight(stores, backend):
    feed(stores, 12)  # the auth key, one batch of 8, and 3 keys: not a whole batch
    master, slave = pair(stores, backend, pool_size=1000, batch_keys=8)
    batches = [m for m in open_session(master, slave) if isinstance(m, KeyBatch)]
    assert [b.count for b in batches] == [1, 8]


def test_a_run_that_differs_at_the_slave_is_rejected_and_quarantined(stores, backend):
    a, b = stores
    feed(stores, 17)
    master, slave = pair(stores, backend, pool_size=16, batch_keys=8)
    to_slave = open_session(master, slave)
    batches = [m for m in to_slave if isinstance(m, KeyBatch)]
    # The second batch's run is not the one site B holds from its first key on.
    to_slave[to_slave.index(batches[1])] = dataclasses.replace(batches[1], qkd_ids_digest=bytes(32))
    replies = []
    for message in to_slave:
        replies += slave.on_message(decode_message(message.encode()), 0.0)
    acks = [m for m in replies if isinstance(m, BatchAck)]
    assert [ack.accepted for ack in acks] == [True, False, True]
    assert "digest" in acks[1].reason
    # The run's keys are used up here; only the other two batches are held.
    assert b.qkd_key_count("site-a") == 0
    assert b.pending_batches("site-a") == [batches[0].batch_id, batches[2].batch_id]
    assert not b.is_qkd_key_consumed("site-a", str(uuid.uuid4()))


def test_a_batch_naming_an_offer_not_outstanding_ends_the_session(stores, backend):
    from qkdd.link_params import LinkError

    feed(stores, 16)
    master, slave = pair(stores, backend, pool_size=4)
    batch = next(m for m in open_session(master, slave) if isinstance(m, KeyBatch))
    forged = dataclasses.replace(batch, offer_id=batch.offer_id + 100)
    with pytest.raises(LinkError, match="not outstanding"):
        slave.on_message(forged, 0.0)


def test_too_many_offers_or_batches_end_the_session(stores, backend):
    from qkdd.link_params import LinkError

    feed(stores, 16)
    master, slave = pair(stores, backend, pool_size=0)
    open_session(master, slave)
    offer = KemOffer(999, bytes(1184))
    with pytest.raises(LinkError, match="offers outstanding"):
        for _ in range(3 * WINDOW):
            master.on_message(offer, 0.0)


def test_listed_qkd_ids_let_the_slave_ask_its_device_for_them(stores, backend):
    a, b = stores
    keys = feed(stores, 9, only="a")
    master, slave = pair(stores, backend, pool_size=8, batch_keys=8, list_ids=True)
    to_slave = open_session(master, slave)
    batches = [m for m in to_slave if isinstance(m, KeyBatch)]
    assert all(len(m.qkd_key_ids) == m.qkd_key_count for m in batches)
    replies = []
    for message in to_slave:
        replies += slave.on_message(decode_message(message.encode()), 0.0)
    assert not [m for m in replies if isinstance(m, BatchAck)]  # nothing here yet: wait
    assert slave.awaited_qkd_keys() == [keys[0].key_id]  # the first waiting batch's
    b.store_qkd_keys("site-a", keys)  # the KME hands them over
    replies = slave.poll(0.1)
    assert [m.accepted for m in replies if isinstance(m, BatchAck)] == [True, True]


def test_while_short_of_a_whole_batch_the_master_does_not_read_the_run_again(
    stores, backend, monkeypatch
):
    a, b = stores
    feed(stores, 12)  # the auth key, one batch of 8, and 3 keys: not a whole batch
    master, slave = pair(stores, backend, pool_size=1000, batch_keys=8)
    open_session(master, slave)
    reads = []
    real = a.oldest_qkd_run
    monkeypatch.setattr(a, "oldest_qkd_run", lambda *args: reads.append(args) or real(*args))
    for step in range(20):
        assert not [m for m in master.poll(0.01 * step) if isinstance(m, KeyBatch)]
    assert reads == []
    feed(stores, 4, only="a")  # 7 keys: still short
    assert not [m for m in master.poll(0.3) if isinstance(m, KeyBatch)]
    assert reads == []
    feed(stores, 1, only="a")  # 8: a whole batch
    (batch,) = [m for m in master.poll(0.4) if isinstance(m, KeyBatch)]
    # One read makes it; the next finds the buffer empty (cheap) for the next batch.
    assert batch.count == 8 and len(reads) == 2 and reads[1][1] == 8 * 32
