"""Sealing relayed QKD material hop by hop (qkdd.relay.hop_seal): a chain of seal and open
carries the material exactly, each hop under QKD keys of its own that no other hop or frame
touches; any bit flipped in any frame or ACK is refused; the byte formats decode only what
they encode, and whatever bytes arrive, decoding raises nothing but RelayFrameError."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from cryptography.hazmat.primitives.poly1305 import Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relay_chain import QKD_KEY_SIZE, QkdLink, flipped, site_names

from qkdd import labels
from qkdd.relay.hop_seal import (
    ACK_SIZE,
    MAC_MATERIAL_SIZE,
    MAX_MATERIAL_SIZE,
    HopKey,
    HopKeys,
    HopTagInvalid,
    RelayFrameError,
    RelayKeysFrame,
    RelayUsageError,
    decode_relay_ack,
    decode_relay_keys,
    hop_keys_needed,
    make_ack,
    open_hop,
    seal_hop,
    verify_ack,
)

TRANSFER = bytes(range(16))


def relay_along(hops: int, material: bytes, links: list[QkdLink]) -> list[dict]:
    """Seal at the source, open and reseal at each relay, open at the destination; what each
    hop sent and what each receiver got."""
    path = site_names(hops)
    record = []
    carried = material
    for hop in range(hops):
        keys = links[hop].pick_hop_keys(len(carried))
        sealed = seal_hop(TRANSFER, path, hop, 256, carried, keys)
        body = sealed.frame.encode()
        frame = decode_relay_keys(body)
        opened = open_hop(
            frame, links[hop].fetch(frame.header), sender=path[hop], receiver=path[hop + 1]
        )
        ack = make_ack(frame, opened.ack_key)
        verify_ack(decode_relay_ack(ack.encode()), sealed.frame, sealed.ack_key)
        record.append(
            {"body": body, "keys": keys, "ack": ack.encode(), "ack_key": sealed.ack_key}
            | {"received": opened.material, "sealed": sealed}
        )
        carried = opened.material
    return record


@pytest.mark.parametrize("hops", [3, 4])
def test_the_destination_gets_exactly_the_material(hops: int) -> None:
    links = [QkdLink(i) for i in range(hops)]
    material = os.urandom(8 * 32)
    record = relay_along(hops, material, links)
    assert record[-1]["received"] == material
    # Each relay (every receiver but the last) saw the material in the clear: the QKD half
    # of a relayed key is known to every relay, hence the end-to-end ML-KEM part.
    assert [hop["received"] for hop in record[:-1]] == [material] * (hops - 1)
    # No ciphertext shows the material.
    for hop in record:
        assert material not in hop["body"]


@pytest.mark.parametrize("hops", [3, 4])
def test_every_hop_uses_pad_material_of_its_own(hops: int) -> None:
    links = [QkdLink(i) for i in range(hops)]
    for _ in range(3):  # three transfers over the same links
        relay_along(hops, os.urandom(5 * 32), links)
    ranges = sorted(r for link in links for r in link.ranges)
    for (hop_a, _, end_a), (hop_b, start_b, _) in zip(ranges, ranges[1:], strict=False):
        assert hop_a != hop_b or end_a <= start_b, "a byte of QKD material was used twice"
    # Per hop: 5 pad keys and 2 MAC keys, three times over.
    for link in links:
        assert len(link.ranges) == 3 * (5 + 2)


def test_pad_and_mac_keys_are_disjoint_and_each_needed() -> None:
    link = QkdLink(0)
    keys = link.pick_hop_keys(100)
    assert hop_keys_needed(100, QKD_KEY_SIZE) == (4, 2)
    ids = [k.key_id for k in keys.pad + keys.mac]
    assert len(set(ids)) == len(ids)
    path = site_names(1)
    extra = HopKeys(keys.pad + tuple(link.pick(1)), keys.mac)
    with pytest.raises(RelayUsageError, match="pad key 4 is not needed"):
        seal_hop(TRANSFER, path, 0, 8, bytes(100), extra)
    with pytest.raises(RelayUsageError, match="cover 96 bytes, 100 are needed"):
        seal_hop(TRANSFER, path, 0, 8, bytes(100), HopKeys(keys.pad[:3], keys.mac))
    with pytest.raises(RelayUsageError, match="a QKD key is listed twice"):
        seal_hop(TRANSFER, path, 0, 8, bytes(100), HopKeys(keys.pad, (keys.pad[0], keys.mac[0])))
    with pytest.raises(RelayUsageError, match="whole keys of 256 bits"):
        seal_hop(TRANSFER, path, 0, 256, bytes(100), keys)


def test_the_tag_is_poly1305_over_the_documented_input() -> None:
    link = QkdLink(0)
    keys = link.pick_hop_keys(64)
    path = ("site-a", "site-b", "site-c")
    sealed = seal_hop(TRANSFER, path, 0, 256, bytes(range(64)), keys)
    mac = b"".join(k.material for k in keys.mac)[:MAC_MATERIAL_SIZE]
    pad = b"".join(k.material for k in keys.pad)
    body = sealed.frame.encode()
    header = body[: -64 - 16]
    # The header byte for byte, as docs/protocol.md §10 gives it.
    expected_header = (
        b"\x01"
        + TRANSFER
        + b"\x03"
        + b"".join(bytes([len(s)]) + s.encode() for s in path)
        + b"\x00"
        + struct.pack(">IHH", 2, 256, 2)
        + b"".join(k.key_id for k in keys.pad)
        + b"\x02"
        + b"".join(k.key_id for k in keys.mac)
    )
    assert header == expected_header
    ciphertext = bytes(a ^ b for a, b in zip(range(64), pad, strict=True))
    assert body[len(header) : -16] == ciphertext
    label = labels.LABEL_RELAY_KEYS
    mac_input = struct.pack(">I", len(label)) + label + header + ciphertext
    assert sealed.frame.tag == Poly1305.generate_tag(mac[:32], mac_input)
    assert sealed.ack_key == mac[32:]
    ack = make_ack(sealed.frame, sealed.ack_key)
    ack_label = labels.LABEL_RELAY_ACK
    ack_input = (
        struct.pack(">I", len(ack_label)) + ack_label + b"\x01" + TRANSFER + b"\x00"
    ) + sealed.frame.tag
    assert ack.tag == Poly1305.generate_tag(mac[32:], ack_input)
    assert ack.encode() == b"\x01" + TRANSFER + b"\x00" + ack.tag
    assert len(ack.encode()) == ACK_SIZE


@pytest.mark.parametrize("hops", [3, 4])
def test_any_bit_flipped_in_any_frame_is_refused(hops: int) -> None:
    path = site_names(hops)
    record = relay_along(hops, os.urandom(2 * 32), [QkdLink(i) for i in range(hops)])
    for hop, sent in enumerate(record):
        keys: HopKeys = sent["keys"]
        by_id = {k.key_id: k for k in keys.pad + keys.mac}
        body = sent["body"]
        for bit in range(len(body) * 8):
            with pytest.raises(RelayFrameError):
                frame = decode_relay_keys(flipped(body, bit))
                # The receiving store hands out the keys the (altered) header names; a key
                # it does not hold comes out empty, which no frame accepts.
                named = HopKeys(
                    tuple(by_id.get(i, HopKey(i, b"")) for i in frame.header.pad_key_ids),
                    tuple(by_id.get(i, HopKey(i, b"")) for i in frame.header.mac_key_ids),
                )
                open_hop(frame, named, sender=path[hop], receiver=path[hop + 1])
        # The ACK: every bit of it, checked by the hop's sender.
        for bit in range(ACK_SIZE * 8):
            with pytest.raises(RelayFrameError):
                ack = decode_relay_ack(flipped(sent["ack"], bit))
                verify_ack(ack, sent["sealed"].frame, sent["ack_key"])


def test_a_frame_does_not_fit_another_hop_or_other_keys() -> None:
    links = [QkdLink(i) for i in range(3)]
    record = relay_along(3, os.urandom(32), links)
    path = site_names(3)
    frame = decode_relay_keys(record[1]["body"])
    keys = record[1]["keys"]
    with pytest.raises(RelayFrameError, match="for hop site-b -> site-c came on site-a -> site-b"):
        open_hop(frame, keys, sender=path[0], receiver=path[1])
    other = record[2]["keys"]
    with pytest.raises(RelayFrameError, match="not the keys the header names"):
        open_hop(frame, other, sender=path[1], receiver=path[2])
    # Same key IDs, other material (a store out of step): the tag does not verify.
    wrong = HopKeys(keys.pad, tuple(HopKey(k.key_id, bytes(QKD_KEY_SIZE)) for k in keys.mac))
    with pytest.raises(HopTagInvalid):
        open_hop(frame, wrong, sender=path[1], receiver=path[2])
    # An ACK of one hop does not acknowledge another.
    ack = decode_relay_ack(record[0]["ack"])
    with pytest.raises(RelayFrameError, match="another transfer or hop"):
        verify_ack(ack, record[1]["sealed"].frame, record[1]["ack_key"])


def test_secrets_stay_out_of_reprs() -> None:
    link = QkdLink(0)
    keys = link.pick_hop_keys(32)
    material = bytes(range(100, 132))
    sealed = seal_hop(TRANSFER, site_names(1), 0, 256, material, keys)
    opened = open_hop(sealed.frame, keys, sender="site-a", receiver="site-b")
    text = repr((keys, sealed, opened))
    for secret in [material, sealed.ack_key, *(k.material for k in keys.pad + keys.mac)]:
        assert secret.hex() not in text and repr(secret) not in text


# -- Byte formats ------------------------------------------------------------------------


def genuine_body() -> bytes:
    keys = QkdLink(0).pick_hop_keys(64)
    return seal_hop(TRANSFER, site_names(2), 1, 256, bytes(64), keys).frame.encode()


def header_with(**changes: object) -> bytes:
    """A RELAY_KEYS body encoded field by field, bypassing the checks ``encode`` makes."""
    f: dict = {
        "path": (b"site-a", b"site-b"),
        "hop_index": 0,
        "key_count": 1,
        "key_bits": 256,
        "pad_key_ids": (b"p" * 16,),
        "mac_key_ids": (b"m" * 16, b"n" * 16),
    } | changes
    out = b"\x01" + TRANSFER + bytes([len(f["path"])])
    out += b"".join(bytes([len(site)]) + site for site in f["path"])
    out += struct.pack(">BIH", f["hop_index"], f["key_count"], f["key_bits"])
    out += struct.pack(">H", len(f["pad_key_ids"])) + b"".join(f["pad_key_ids"])
    out += bytes([len(f["mac_key_ids"])]) + b"".join(f["mac_key_ids"])
    size = f["key_count"] * f["key_bits"] // 8
    return out + bytes(min(size, 4096)) + bytes(16)


BAD_BODIES = {
    "empty": (b"", "truncated"),
    "other version": (b"\x02" + genuine_body()[1:], "format version 2"),
    "truncated": (genuine_body()[:-1], "truncated"),
    "trailing bytes": (genuine_body() + b"\x00", "1 trailing bytes"),
    "one-site path": (header_with(path=(b"site-a",)), "a path has 2 to 16 sites"),
    "a site twice": (header_with(path=(b"site-a", b"site-a")), "appears twice"),
    "not a site ID": (header_with(path=(b"site-a", b"-b")), "'-b' is not a site ID"),
    "not UTF-8": (header_with(path=(b"site-a", b"\xff\xfe")), "not UTF-8"),
    "hop beyond the path": (header_with(hop_index=1), "hop 1 is not a hop"),
    "zero-bit keys": (header_with(key_bits=0), "8 to 8192 bits"),
    "odd bits": (header_with(key_bits=12), "whole bytes"),
    "no keys": (header_with(key_count=0), "1 byte to"),
    "too much material": (header_with(key_count=MAX_MATERIAL_SIZE // 32 + 1), "1 byte to"),
    "no pad key": (header_with(pad_key_ids=()), "1 to 16384 pad keys"),
    "no MAC key": (header_with(mac_key_ids=()), "1 to 64 MAC keys"),
    "a key twice": (header_with(mac_key_ids=(b"p" * 16,)), "listed twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_malformed_frames_are_refused_with_a_reason(case: str) -> None:
    body, reason = BAD_BODIES[case]
    with pytest.raises(RelayFrameError, match=reason):
        decode_relay_keys(body)


def test_malformed_acks_are_refused_with_a_reason() -> None:
    ack = b"\x01" + TRANSFER + b"\x00" + bytes(16)
    assert decode_relay_ack(ack).hop_index == 0
    with pytest.raises(RelayFrameError, match="33 bytes, not 34"):
        decode_relay_ack(ack[:-1])
    with pytest.raises(RelayFrameError, match="format version 0"):
        decode_relay_ack(b"\x00" + ack[1:])
    with pytest.raises(RelayFrameError, match="beyond the longest path"):
        decode_relay_ack(ack[:17] + b"\x0f" + ack[18:])


def test_frames_round_trip() -> None:
    body = genuine_body()
    frame = decode_relay_keys(body)
    assert isinstance(frame, RelayKeysFrame) and frame.encode() == body
    assert frame.header.path == ("site-a", "site-b", "site-c") and frame.header.hop_index == 1


def mutations() -> st.SearchStrategy[bytes]:
    body = genuine_body()
    return st.lists(st.tuples(st.integers(0, len(body) - 1), st.integers(0, 255)), max_size=8).map(
        lambda edits: _apply(body, edits)
    ) | st.integers(0, len(body)).map(lambda n: body[:n])


def _apply(body: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(body)
    for at, value in edits:
        out[at] = value
    return bytes(out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600) | mutations())
def test_decoding_raises_only_its_own_error(body: bytes) -> None:
    for decode in (decode_relay_keys, decode_relay_ack):
        with contextlib.suppress(RelayFrameError):
            decode(body)
