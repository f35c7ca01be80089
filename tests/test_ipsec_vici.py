"""The VICI codec (qkdd.ipsec.vici): messages, packets, segments and the packet order of
one command, byte for byte. tests/test_ipsec_real.py runs the same code against charon."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdd.ipsec.vici import (
    MAX_SEGMENT,
    CommandExchange,
    CommandUnknownError,
    Packet,
    PacketType,
    SegmentReader,
    ViciEncodeError,
    ViciProtocolError,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
    sections,
    text,
)

# The encoding example of charon's vici README ("Encoding example"), byte for byte.
README_EXAMPLE = bytes(
    [3, 4, *b"key1", 0, 6, *b"value1"]
    + [1, 8, *b"section1"]
    + [1, 11, *b"sub-section"]
    + [3, 4, *b"key2", 0, 6, *b"value2"]
    + [2]
    + [4, 5, *b"list1"]
    + [5, 0, 5, *b"item1"]
    + [5, 0, 5, *b"item2"]
    + [6]
    + [2]
)
README_TREE = {
    "key1": b"value1",
    "section1": {"sub-section": {"key2": b"value2"}, "list1": [b"item1", b"item2"]},
}


def test_the_readme_example_encodes_and_decodes_byte_for_byte():
    assert encode_message(README_TREE) == README_EXAMPLE
    assert decode_message(README_EXAMPLE) == README_TREE


def test_values_of_every_kind_are_text_as_charon_expects():
    encoded = encode_message({"a": "x", "b": 42, "c": True, "d": False, "e": -1, "f": b"\x00"})
    assert decode_message(encoded) == {
        "a": b"x",
        "b": b"42",
        "c": b"yes",
        "d": b"no",
        "e": b"-1",
        "f": b"\x00",
    }


def test_a_load_shared_request_packet_byte_for_byte():
    packet = encode_packet(
        PacketType.CMD_REQUEST,
        "load-shared",
        {"id": "p", "type": "PPK", "data": b"\xff\x00", "owners": ["o"]},
    )
    body = (
        bytes([0, 11])
        + b"load-shared"
        + bytes([3, 2])
        + b"id"
        + bytes([0, 1])
        + b"p"
        + bytes([3, 4])
        + b"type"
        + bytes([0, 3])
        + b"PPK"
        + bytes([3, 4])
        + b"data"
        + bytes([0, 2, 0xFF, 0])
        + bytes([4, 6])
        + b"owners"
        + bytes([5, 0, 1])
        + b"o"
        + bytes([6])
    )
    assert packet == struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"k": 1.5}, "no VICI encoding for a float"),
        ({"k": None}, "no VICI encoding for a NoneType"),
        ({"": b"x"}, "a name of 1-255 bytes"),
        ({"x" * 256: b"x"}, "a name of 1-255 bytes"),
        ({"clé": b"x"}, "names are ASCII"),
        ({"k": b"x" * 65536}, "at most 65535"),
        ({"k": [b"x", 1.0]}, r"k\[1\]: no VICI encoding"),
    ],
)
def test_what_vici_cannot_carry_is_refused(message, expected):
    with pytest.raises(ViciEncodeError, match=expected):
        encode_message(message)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (bytes([1, 1, *b"s"]), "ends inside a section"),
        (bytes([2]), "a section end without a section"),
        (bytes([4, 1, *b"l", 5, 0, 1, *b"x"]), "ends inside a list"),
        (bytes([4, 1, *b"l", 3, 1, *b"k", 0, 0]), "element type 3 inside a list"),
        (bytes([5, 0, 1, *b"x"]), "element type 5 outside a list"),
        (bytes([9]), "element type 9"),
        (bytes([3, 1, *b"k", 0, 5, *b"abc"]), "ends inside a value"),
        (bytes([3, 5, *b"k"]), "ends inside a name"),
        (bytes([3, 1, *b"k", 0, 0, 3, 1, *b"k", 0, 0]), "key 'k' twice"),
        (bytes([3, 1, 0xFF, 0, 0]), "not ASCII"),
        (bytes([1, 1, *b"s"]) * 40, "nested deeper than 32"),
    ],
)
def test_malformed_messages_are_protocol_errors(data, expected):
    with pytest.raises(ViciProtocolError, match=expected):
        decode_message(data)


def test_segments_split_at_any_byte_and_several_arrive_at_once():
    stream = (
        encode_packet(PacketType.EVENT_CONFIRM)
        + encode_packet(PacketType.EVENT, "list-sa", {"a": {"b": "c"}})
        + encode_packet(PacketType.CMD_RESPONSE, None, {"success": "yes"})
    )
    for size in (1, 2, 7, len(stream)):
        reader = SegmentReader()
        packets: list[Packet] = []
        for start in range(0, len(stream), size):
            packets += reader.feed(stream[start : start + size])
        assert [p.type for p in packets] == [5, 7, 1]
        assert packets[1].name == "list-sa" and packets[1].message == {"a": {"b": b"c"}}
        assert packets[2].message == {"success": b"yes"} and reader.pending == 0


def test_an_oversized_segment_is_refused_before_its_data_arrives():
    reader = SegmentReader()
    with pytest.raises(ViciProtocolError, match="a segment of 524289 bytes"):
        reader.feed(struct.pack(">I", MAX_SEGMENT + 1))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "an empty segment"),
        (bytes([8]), "unknown packet type 8"),
        (bytes([0, 5, *b"ab"]), "ends inside a name"),
    ],
)
def test_malformed_packets_are_protocol_errors(body, expected):
    with pytest.raises(ViciProtocolError, match=expected):
        decode_packet(body)


def test_packet_names_only_on_named_types():
    with pytest.raises(ViciEncodeError, match="has no name"):
        encode_packet(PacketType.CMD_RESPONSE, "x")
    with pytest.raises(ViciEncodeError, match="a name must be text"):
        encode_packet(PacketType.CMD_REQUEST, None)
    with pytest.raises(ViciEncodeError, match="unknown packet type"):
        encode_packet(9)


def test_a_plain_command_is_one_request_and_one_response():
    exchange = CommandExchange("version")
    assert exchange.start() == encode_packet(PacketType.CMD_REQUEST, "version")
    assert exchange.receive(Packet(PacketType.CMD_RESPONSE, None, {"daemon": b"charon"})) == b""
    assert exchange.done and exchange.response == {"daemon": b"charon"}
    with pytest.raises(ViciProtocolError, match="after the response"):
        exchange.receive(Packet(PacketType.CMD_RESPONSE))


def test_a_streaming_command_registers_first_and_collects_its_events():
    exchange = CommandExchange("list-sas", {"noblock": "yes"}, event="list-sa")
    assert exchange.start() == encode_packet(PacketType.EVENT_REGISTER, "list-sa")
    request = exchange.receive(Packet(PacketType.EVENT_CONFIRM))
    assert request == encode_packet(PacketType.CMD_REQUEST, "list-sas", {"noblock": "yes"})
    exchange.receive(Packet(PacketType.EVENT, "list-sa", {"one": {}}))
    exchange.receive(Packet(PacketType.EVENT, "ike-updown", {"other": {}}))  # not ours
    exchange.receive(Packet(PacketType.EVENT, "list-sa", {"two": {}}))
    assert not exchange.done
    exchange.receive(Packet(PacketType.CMD_RESPONSE))
    assert exchange.events == [{"one": {}}, {"two": {}}]


@pytest.mark.parametrize(
    ("event", "packets", "error", "expected"),
    [
        (None, [Packet(PacketType.CMD_UNKNOWN)], CommandUnknownError, "no command 'x'"),
        ("e", [Packet(PacketType.EVENT_UNKNOWN)], CommandUnknownError, "no event 'e'"),
        ("e", [Packet(PacketType.CMD_RESPONSE)], ViciProtocolError, "while registering"),
        (None, [Packet(PacketType.EVENT_CONFIRM)], ViciProtocolError, "unexpected packet"),
    ],
)
def test_unknown_commands_and_packets_out_of_order_are_errors(event, packets, error, expected):
    exchange = CommandExchange("x", event=event)
    exchange.start()
    with pytest.raises(error, match=expected):
        for packet in packets:
            exchange.receive(packet)


def test_reading_values():
    tree = decode_message(README_EXAMPLE)
    assert text(tree, "key1") == "value1"
    assert text(tree, "section1") is None and text(tree, "nothing", "-") == "-"
    assert [name for name, _ in sections(tree)] == ["section1"]
    assert [name for name, _ in sections(tree, "section1")] == ["sub-section"]
    assert list(sections(tree, "key1")) == []


VALUES = st.one_of(
    st.binary(max_size=40),
    st.lists(st.binary(max_size=10), max_size=4),
)
NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
TREES = st.recursive(
    st.dictionaries(NAMES, VALUES, max_size=4),
    lambda children: st.dictionaries(NAMES, st.one_of(VALUES, children), max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(TREES)
def test_any_tree_survives_a_round_trip(tree):
    assert decode_message(encode_message(tree)) == tree


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_raises_only_protocol_errors(data):
    with contextlib.suppress(ViciProtocolError):
        decode_message(data)
    with contextlib.suppress(ViciProtocolError):
        SegmentReader().feed(data)
