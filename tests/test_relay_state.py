"""The relayed transfers of each site (qkdd.relay.relay_state) in a chain of RelaySite objects
over shared QKD material (tests/relay_chain.py), with a simulated clock: the material arrives
whole, each site holds it only as long as its role says, frames and ACKs that were altered or
replayed are refused, transfers that stall are abandoned at their deadline with their keys
consumed."""

from __future__ import annotations

import os

import pytest
from relay_chain import Chain, KeyNotHeld, flipped

from qkdd.relay.hop_seal import (
    RelayFrameError,
    RelayUsageError,
    decode_relay_ack,
    decode_relay_keys,
)
from qkdd.relay.relay_state import (
    CONFIRM_TIMEOUT,
    HOP_TIMEOUT,
    HopAcked,
    MaterialDelivered,
    RelayRejected,
    RelayRole,
    SendRelayAck,
    SendRelayKeys,
    TransferAbandoned,
)

TRANSFER = b"T" * 16


@pytest.mark.parametrize("hops", [3, 4])
def test_the_material_crosses_the_chain_and_each_site_holds_it_as_its_role_says(
    hops: int,
) -> None:
    chain = Chain(hops)
    material = os.urandom(4 * 32)
    chain.start(TRANSFER, material)
    delivered = chain.actions_of(MaterialDelivered)
    assert len(delivered) == 1
    at, action = delivered[0]
    assert at == chain.names[-1] and isinstance(action, MaterialDelivered)
    assert action.material == material and action.path == tuple(chain.names)
    # Every relay saw the plaintext (it learns the QKD half of the key: the reason for the
    # end-to-end ML-KEM part), and dropped it once the next hop acknowledged.
    assert sorted(chain.relay_views) == chain.names[1:-1]
    assert all(views == [material] for views in chain.relay_views.values())
    acked = {(at, a.role) for at, a in chain.actions_of(HopAcked)}
    assert acked == {(chain.names[0], RelayRole.SOURCE)} | {
        (name, RelayRole.RELAY) for name in chain.names[1:-1]
    }
    for index in range(1, hops + 1):
        site = chain.site(index)
        assert site.held_material(TRANSFER) is None and site.open_transfers() == {}
        assert site.next_deadline() is None
    # The source keeps its copy until the end-to-end confirmation, then hands it over.
    source = chain.site(0)
    assert source.held_material(TRANSFER) == material
    assert source.open_transfers() == {TRANSFER: "awaiting end-to-end confirmation"}
    assert source.next_deadline() == chain.now + CONFIRM_TIMEOUT
    assert source.release_confirmed(TRANSFER, chain.now) == material
    assert source.held_material(TRANSFER) is None and source.next_deadline() is None
    assert not chain.actions_of(TransferAbandoned)


@pytest.mark.parametrize("hops", [3, 4])
def test_no_byte_of_qkd_material_serves_twice(hops: int) -> None:
    chain = Chain(hops)
    for n in range(4):
        chain.start(bytes([n]) * 16, os.urandom(3 * 32))
    assert len(chain.actions_of(MaterialDelivered)) == 4
    for link in chain.links:
        ranges = sorted(link.ranges)
        assert len(ranges) == 4 * (3 + 2)  # per transfer: 3 pad keys, 2 MAC keys
        for (_, _, end), (_, start, _) in zip(ranges, ranges[1:], strict=False):
            assert end <= start, f"hop {link.hop} used a byte of QKD material twice"


@pytest.mark.parametrize("hops", [3, 4])
def test_a_flipped_bit_in_any_frame_at_any_hop_is_refused(hops: int) -> None:
    material = os.urandom(32)
    genuine = Chain(hops)
    genuine.start(TRANSFER, material)
    bodies = [body for _, body in genuine.sent_bodies(SendRelayKeys)]
    assert len(bodies) == hops
    for hop, body in enumerate(bodies):
        # Bits across the header, the key IDs, the ciphertext and every bit of the tag.
        bits = list(range(0, len(body) * 8, 13)) + list(range((len(body) - 16) * 8, len(body) * 8))
        for bit in bits:

            def tamper(at: int, kind: str, sent: bytes, hop: int = hop, bit: int = bit) -> bytes:
                return flipped(sent, bit) if (at, kind) == (hop, "keys") else sent

            chain = Chain(hops, tamper=tamper)
            with pytest.raises((RelayFrameError, KeyNotHeld)):
                chain.start(TRANSFER, material)
            assert not chain.actions_of(MaterialDelivered)
            receiver = chain.site(hop + 1)
            assert receiver.held_material(TRANSFER) is None


@pytest.mark.parametrize("hops", [3, 4])
def test_a_flipped_bit_in_any_ack_is_refused(hops: int) -> None:
    for hop in range(hops):
        # Version, transfer ID, hop index, then the first and last bits of the tag.
        for bit in (0, 8 * 5 + 3, 8 * 17, 8 * 18, 8 * 33 + 7):

            def tamper(at: int, kind: str, sent: bytes, hop: int = hop, bit: int = bit) -> bytes:
                return flipped(sent, bit) if (at, kind) == (hop, "ack") else sent

            chain = Chain(hops, tamper=tamper)
            with pytest.raises(RelayFrameError):
                chain.start(TRANSFER, os.urandom(32))
            sender = chain.site(hop)
            if bit >= 8 * 18:
                # A tag that does not verify ends the transfer at once (one verification
                # per one-time key): a relay drops the material, a source its copy.
                assert TRANSFER not in sender.open_transfers()
            else:
                # An ACK that names nothing awaited is refused; the genuine one never
                # comes, and the transfer ends at its deadline.
                deadline = sender.next_deadline()
                assert deadline == chain.now + HOP_TIMEOUT
                role = RelayRole.SOURCE if hop == 0 else RelayRole.RELAY
                assert sender.poll(deadline + 1) == [
                    TransferAbandoned(TRANSFER, role, "the next hop did not acknowledge in time")
                ]
            assert sender.held_material(TRANSFER) is None


def test_a_replayed_frame_or_ack_is_refused() -> None:
    chain = Chain(3)
    chain.start(TRANSFER, os.urandom(64))
    frames = chain.sent_bodies(SendRelayKeys)
    acks = chain.sent_bodies(SendRelayAck)
    # The relay (site-b) and the destination (site-d) both refuse the same frame again,
    # before the caller takes any key for it.
    for hop in (0, 2):
        with pytest.raises(RelayRejected, match="already seen here"):
            chain.deliver_keys(hop + 1, frames[hop][1])
    by_sender = dict(acks)
    for receiver in range(3):  # every ACK again, at the site it acknowledged
        with pytest.raises(RelayRejected, match="awaits an ACK"):
            chain.deliver_ack(receiver, by_sender[chain.names[receiver + 1]])
    # Long after (the site forgot the transfer ID), the keys it names are consumed at the
    # receiving end: still refused, and nothing delivered twice.
    chain.now += 10 * 3600
    chain.site(3).poll(chain.now)
    with pytest.raises(KeyNotHeld):
        chain.deliver_keys(3, frames[2][1])
    assert len(chain.actions_of(MaterialDelivered)) == 1


def test_a_frame_on_the_wrong_hop_is_refused_before_any_key_is_taken() -> None:
    chain = Chain(3)
    chain.start(TRANSFER, os.urandom(32))
    frame = decode_relay_keys(chain.sent_bodies(SendRelayKeys)[1][1])  # site-b -> site-c
    with pytest.raises(RelayRejected, match="came on site-a -> site-c"):
        chain.site(2).admit(frame, "site-a", now=chain.now)
    with pytest.raises(RelayRejected, match="came on site-c -> site-d"):
        chain.site(3).admit(frame, "site-c", now=chain.now)


def test_a_relay_that_never_gets_the_ack_abandons_at_its_deadline() -> None:
    dropped: list[bytes] = []

    def drop_acks_of_hop_1(at: int, kind: str, sent: bytes) -> bytes | None:
        if (at, kind) == (1, "ack"):
            dropped.append(sent)
            return None
        return sent

    chain = Chain(3, tamper=drop_acks_of_hop_1)
    material = os.urandom(64)
    chain.start(TRANSFER, material)
    assert len(chain.actions_of(MaterialDelivered)) == 1  # the destination got it
    relay = chain.site(1)
    assert relay.held_material(TRANSFER) == material
    assert relay.open_transfers() == {TRANSFER: "awaiting the next hop's ACK"}
    deadline = relay.next_deadline()
    assert deadline == chain.now + HOP_TIMEOUT
    assert relay.poll(deadline) == []  # not before the deadline
    abandoned = relay.poll(deadline + 0.001)
    assert abandoned == [
        TransferAbandoned(TRANSFER, RelayRole.RELAY, "the next hop did not acknowledge in time")
    ]
    assert relay.held_material(TRANSFER) is None and relay.next_deadline() is None
    # The late ACK fits nothing any more; the keys of both hops stay consumed, so the next
    # transfer takes fresh ones.
    with pytest.raises(RelayRejected):
        relay.receive_ack(decode_relay_ack(dropped[0]), "site-c", deadline + 1)
    used = [len(link.ranges) for link in chain.links]
    chain.tamper = None
    chain.now = deadline + 2
    chain.start(b"U" * 16, os.urandom(64))
    assert [len(link.ranges) for link in chain.links] == [n + 4 for n in used]
    assert all(len(set(link.ranges)) == len(link.ranges) for link in chain.links)


def test_a_source_without_confirmation_abandons_and_drops_its_copy() -> None:
    chain = Chain(3)
    chain.start(TRANSFER, os.urandom(32))
    source = chain.site(0)
    deadline = source.next_deadline()
    assert deadline == chain.now + CONFIRM_TIMEOUT
    assert source.poll(deadline + 1) == [
        TransferAbandoned(TRANSFER, RelayRole.SOURCE, "no end-to-end confirmation in time")
    ]
    assert source.held_material(TRANSFER) is None
    with pytest.raises(RelayUsageError):
        source.release_confirmed(TRANSFER, deadline + 2)


def test_the_source_refuses_a_transfer_id_in_use_or_a_path_not_its_own() -> None:
    chain = Chain(3)
    chain.start(TRANSFER, os.urandom(32))
    with pytest.raises(RelayUsageError, match="already in use"):
        chain.start(TRANSFER, os.urandom(32))
    keys = chain.links[1].pick_hop_keys(32)
    with pytest.raises(RelayUsageError, match="begins with it"):
        chain.site(0).start(b"V" * 16, chain.names[1:], 256, bytes(32), keys, now=chain.now)


def test_a_relay_without_next_hop_keys_holds_the_material_until_its_deadline() -> None:
    chain = Chain(3, withheld=frozenset({1}))  # site-b's pads towards site-c never come
    material = os.urandom(2 * 32)
    chain.start(TRANSFER, material)
    relay = chain.site(1)
    assert relay.held_material(TRANSFER) == material
    assert relay.open_transfers() == {TRANSFER: "awaiting next-hop keys"}
    deadline = relay.next_deadline()
    assert deadline == chain.now + HOP_TIMEOUT
    assert relay.poll(deadline) == []  # not before the deadline
    assert relay.poll(deadline + 1) == [
        TransferAbandoned(TRANSFER, RelayRole.RELAY, "no next-hop keys in time")
    ]
    assert relay.held_material(TRANSFER) is None and relay.open_transfers() == {}
    assert not chain.actions_of(MaterialDelivered)


def test_secrets_stay_out_of_reprs() -> None:
    chain = Chain(3)
    material = os.urandom(32)
    chain.start(TRANSFER, material)
    text = repr(chain.log) + repr(chain.sites)
    assert material.hex() not in text and repr(material) not in text
