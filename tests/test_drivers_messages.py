"""Message codecs without I/O: every message round-trips, every malformed payload raises
MessageError (a ProtocolError), and any payload the decoder accepts re-encodes to exactly
the same bytes (one encoding per message)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdd_drivers.device_errors import MessageError, ProtocolError
from qkdd_drivers.serial.serial_constants import MAX_KEY_MATERIAL_SIZE, MAX_PAYLOAD_SIZE
from qkdd_drivers.serial.serial_messages import (
    Ack,
    Identity,
    KeyEntry,
    Keys,
    LinkState,
    SerialErrorCode,
    SerialErrorMessage,
    SerialHello,
    SerialMessageType,
    SerialRole,
    Status,
    decode_message,
    encode_message,
)

KID = bytes.fromhex("6ba7b8109dad11d180b400c04fd430c8")


def roundtrip(msg):  # type: ignore[no-untyped-def]
    msg_type, payload = encode_message(msg)
    return decode_message(msg_type, payload)


@pytest.mark.parametrize(
    "msg",
    [
        SerialHello(SerialRole.HOST, 1, 1, 0, 0, 4096, "qkdd"),
        SerialHello(SerialRole.DEVICE, 1, 3, 2, 128, 1280, "dev-α"),
        Status(LinkState.UP, 0.0213, 1200, 37),
        Status(LinkState.DOWN, None, None, None),
        Status(LinkState.STARTING, 1.0, 0, 0),
        Keys((KeyEntry(KID, b"\x00" * 32), KeyEntry(os.urandom(16), os.urandom(1024)))),
        Ack((KID,)),
        Ack(tuple(os.urandom(16) for _ in range(255))),
        SerialErrorMessage(SerialErrorCode.DEVICE_FAULT, "laser temperature out of range"),
        SerialErrorMessage(0x7777, ""),
    ],
)
def test_roundtrip(msg) -> None:  # type: ignore[no-untyped-def]
    assert roundtrip(msg) == msg


def test_key_material_is_not_in_repr() -> None:
    entry = KeyEntry(KID, b"TOPSECRET-MATERIAL")
    assert "TOPSECRET" not in repr(entry)
    assert "TOPSECRET" not in repr(Keys((entry,)))


def test_status_qber_resolution() -> None:
    status = roundtrip(Status(LinkState.UP, 0.12346, None, None))
    assert status.qber == pytest.approx(0.1235)


def test_error_detail_is_cut_at_a_character_boundary() -> None:
    msg = roundtrip(SerialErrorMessage(SerialErrorCode.DEVICE_FAULT, "é" * 150))
    assert msg.detail == "é" * 100


@pytest.mark.parametrize(
    "msg",
    [
        SerialHello(SerialRole.HOST, 1, 1, 1, 0, 4096),  # a host must not select
        SerialHello(SerialRole.DEVICE, 2, 1, 0, 1, 4096),  # empty range
        SerialHello(SerialRole.DEVICE, 1, 1, 0, 0, 4096),  # device window 0
        SerialHello(SerialRole.HOST, 1, 1, 0, 0, 512),  # max_frame below 1280
        SerialHello(SerialRole.HOST, 1, 1, 0, 0, 4096, "x" * 33),
        Status(LinkState.UP, 1.5, None, None),
        Status(LinkState.UP, None, 2**32, None),
        Keys(()),
        Keys((KeyEntry(KID, b""),)),
        Keys((KeyEntry(KID, b"\x01" * (MAX_KEY_MATERIAL_SIZE + 1)),)),
        Keys((KeyEntry(b"short", b"\x01"),)),
        Keys(tuple(KeyEntry(os.urandom(16), b"\x01" * 1000) for _ in range(5))),  # > 1 frame
        Ack(()),
        Ack((b"short",)),
    ],
)
def test_encoder_refuses_invalid_messages(msg) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        encode_message(msg)


def _keys_payload(*entries: tuple[bytes, int, bytes], count: int | None = None) -> bytes:
    out = bytes([len(entries) if count is None else count])
    for key_id, length, material in entries:
        out += key_id + struct.pack(">H", length) + material
    return out


@pytest.mark.parametrize(
    ("msg_type", "payload", "words"),
    [
        (0x7, b"", "unknown message type"),
        (0x0, b"", "unknown message type"),
        (SerialMessageType.HELLO, bytes.fromhex("0101010000001000"), "shorter"),
        (SerialMessageType.HELLO, bytes.fromhex("010101000000100003") + b"ab", "name length"),
        (SerialMessageType.HELLO, bytes.fromhex("030101000000100000"), "role"),
        (SerialMessageType.HELLO, bytes.fromhex("010101000000100002") + b"\xff\xfe", "UTF-8"),
        (SerialMessageType.HELLO, bytes.fromhex("020101000000100000"), "window"),
        (SerialMessageType.HELLO, bytes.fromhex("010101000000ffff00"), "max_frame"),
        (SerialMessageType.STATUS, bytes(10), "11 bytes"),
        (SerialMessageType.STATUS, bytes.fromhex("07") + bytes(10), "link state"),
        (SerialMessageType.STATUS, bytes.fromhex("012711") + bytes(8), "above 100"),
        (SerialMessageType.KEYS, b"", "empty"),
        (SerialMessageType.KEYS, b"\x00", "no key"),
        (SerialMessageType.KEYS, _keys_payload((KID, 4, b"abcd"), count=2), "runs past"),
        (SerialMessageType.KEYS, _keys_payload((KID, 5, b"abcd")), "runs past"),
        (SerialMessageType.KEYS, _keys_payload((KID, 0, b"")), "outside 1..1024"),
        (SerialMessageType.KEYS, _keys_payload((KID, 1025, b"a" * 1025)), "outside 1..1024"),
        (SerialMessageType.KEYS, _keys_payload((KID, 1, b"a"), (KID, 1, b"b")), "repeats"),
        (SerialMessageType.KEYS, _keys_payload((KID, 1, b"a")) + b"x", "after its last key"),
        (SerialMessageType.KEYS, b"\x01" + KID[:10], "header runs past"),
        (SerialMessageType.ACK, b"", "no key ID"),
        (SerialMessageType.ACK, b"\x00", "no key ID"),
        (SerialMessageType.ACK, b"\x02" + KID, "count"),
        (SerialMessageType.ERROR, b"\x00\x01", "shorter"),
        (SerialMessageType.ERROR, b"\x00\x01\x05abc", "detail length"),
        (SerialMessageType.ERROR, b"\x00\x01\x02\xc3\x28", "UTF-8"),
    ],
)
def test_decoder_rejects_malformed_payloads(msg_type: int, payload: bytes, words: str) -> None:
    with pytest.raises(MessageError, match=words):
        decode_message(msg_type, payload)


def test_message_error_is_a_protocol_error() -> None:
    assert issubclass(MessageError, ProtocolError)


# -- property-based --------------------------------------------------------------------

key_entries = st.builds(
    KeyEntry, st.binary(min_size=16, max_size=16), st.binary(min_size=1, max_size=64)
)
messages = st.one_of(
    st.builds(
        SerialHello,
        st.just(SerialRole.DEVICE),
        st.integers(1, 3),
        st.integers(3, 15),
        st.sampled_from([0, 3]),
        st.integers(1, 0xFFFF),
        st.integers(1280, 4096),
        st.text(max_size=8),
    ),
    st.builds(
        Status,
        st.sampled_from(LinkState),
        st.none() | st.integers(0, 10_000).map(lambda q: q / 10_000),
        st.none() | st.integers(0, 2**32 - 2),
        st.none() | st.integers(0, 2**32 - 2),
    ),
    st.lists(key_entries, min_size=1, max_size=40, unique_by=lambda e: e.key_id).map(
        lambda es: Keys(tuple(es))
    ),
    st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=255).map(
        lambda ids: Ack(tuple(ids))
    ),
    st.builds(SerialErrorMessage, st.integers(0, 0xFFFF), st.text(max_size=60)),
)


@settings(max_examples=300)
@given(messages)
def test_any_valid_message_roundtrips(msg) -> None:  # type: ignore[no-untyped-def]
    assert roundtrip(msg) == msg


@settings(max_examples=1000)
@given(st.integers(0, 15), st.binary(max_size=MAX_PAYLOAD_SIZE))
def test_arbitrary_payloads_raise_only_message_error(msg_type: int, payload: bytes) -> None:
    try:
        msg = decode_message(msg_type, payload)
    except MessageError:
        return
    # Whatever is accepted has exactly one encoding.
    assert encode_message(msg) == (msg_type, payload)


@settings(max_examples=300)
@given(st.sampled_from(SerialMessageType), st.data())
def test_mutated_valid_payloads_raise_only_message_error(
    msg_type: SerialMessageType, data: st.DataObject
) -> None:
    seeds = {
        SerialMessageType.HELLO: SerialHello(SerialRole.HOST, 1, 1, 0, 0, 4096, "qkdd"),
        SerialMessageType.STATUS: Status(LinkState.UP, 0.01, 10, 5),
        SerialMessageType.KEYS: Keys(
            (KeyEntry(KID, b"k" * 32), KeyEntry(os.urandom(16), b"j" * 8))
        ),
        SerialMessageType.ACK: Ack((KID, os.urandom(16))),
        SerialMessageType.ERROR: SerialErrorMessage(2, "detail"),
        SerialMessageType.IDENTITY: Identity("site-a", "site-b"),
    }
    _, payload = encode_message(seeds[msg_type])
    mutated = bytearray(payload)
    for index, value in data.draw(
        st.lists(st.tuples(st.integers(0, len(payload) - 1), st.integers(0, 255)), max_size=4)
    ):
        mutated[index] = value
    cut = data.draw(st.integers(0, len(mutated)))
    try:
        msg = decode_message(msg_type, bytes(mutated[:cut]))
    except MessageError:
        return
    assert encode_message(msg) == (msg_type, bytes(mutated[:cut]))
