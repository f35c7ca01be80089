"""The QKD network's link messages (qkdd.peer.network_messages) as the session's message
decoder sees them: each type decodes to its class with its body untouched, reprs show a
body's size only, and an unknown type is refused. Also the key IDs both end sites give a
relayed transfer's keys (qkdd.hybrid.relayed_key_ids), bound to the transfer and its path,
with a recorded vector recomputed here from the construction's description."""

from __future__ import annotations

import hashlib
import struct
import uuid

import pytest

from qkdd import labels
from qkdd.hybrid import relayed_key_ids
from qkdd.key_ids import MAX_INDEX, split_key_id
from qkdd.peer.agreement_messages import MessageType, decode_message
from qkdd.peer.network_messages import (
    LINK_STATE_TYPE,
    NETWORK_MESSAGES,
    RELAY_ACK_TYPE,
    RELAY_KEYS_TYPE,
    ROUTED_TYPE,
    LinkStateMessage,
    NetworkMessage,
    RelayAckMessage,
    RelayKeysMessage,
    RoutedMessage,
)
from qkdd.peer.peer_errors import RemoteProtocolError

# -- the link messages -------------------------------------------------------------------

BODY = b"\x00\x01 sealed material \xfe\xff"


def test_the_four_types_and_their_classes() -> None:
    assert [(cls, cls.TYPE) for cls in NETWORK_MESSAGES] == [
        (RelayKeysMessage, RELAY_KEYS_TYPE),
        (RelayAckMessage, RELAY_ACK_TYPE),
        (LinkStateMessage, LINK_STATE_TYPE),
        (RoutedMessage, ROUTED_TYPE),
    ]
    assert [cls.TYPE for cls in NETWORK_MESSAGES] == [0x0D, 0x0E, 0x0F, 0x10]
    # None of them takes a type of the key agreement's own messages.
    agreement = {v for k, v in vars(MessageType).items() if k.isupper()}
    assert len(agreement) == 12 and not {cls.TYPE for cls in NETWORK_MESSAGES} & agreement


@pytest.mark.parametrize("cls", NETWORK_MESSAGES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("body", [BODY, b"", bytes(range(256)) * 8], ids=["short", "empty", "2k"])
def test_each_type_decodes_to_its_class_with_the_body_unchanged(
    cls: type[NetworkMessage], body: bytes
) -> None:
    encoded = cls(body).encode()
    assert encoded == bytes([cls.TYPE]) + body
    message = decode_message(encoded)
    assert type(message) is cls
    assert isinstance(message, NetworkMessage) and message.body == body
    assert message == cls(body)


@pytest.mark.parametrize("cls", NETWORK_MESSAGES, ids=lambda cls: cls.__name__)
def test_reprs_show_the_size_never_the_body(cls: type[NetworkMessage]) -> None:
    text = repr(decode_message(cls(BODY).encode()))
    assert text == f"{cls.__name__}({len(BODY)} bytes)"
    assert BODY.hex() not in text and repr(BODY) not in text and "sealed" not in text


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown link message type 0x11"):
        decode_message(b"\x11" + BODY)
    with pytest.raises(RemoteProtocolError, match="empty link message"):
        decode_message(b"")


# -- relayed key IDs ---------------------------------------------------------------------

TRANSFER = bytes(range(16))
PATH = ("site-a", "site-b", "site-c")


def test_relayed_key_ids_are_deterministic_canonical_uuids() -> None:
    ids = relayed_key_ids(TRANSFER, PATH, 4)
    assert ids == relayed_key_ids(TRANSFER, PATH, 4)
    for key_id in ids:
        parsed = uuid.UUID(key_id)
        assert str(parsed) == key_id  # lower-case, hyphenated: the canonical form
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_relayed_key_ids_are_consecutive_keys_of_one_prefix() -> None:
    ids = relayed_key_ids(TRANSFER, PATH, 5)
    assert len(ids) == 5 and len(set(ids)) == 5
    split = [split_key_id(key_id) for key_id in ids]
    assert {prefix for prefix, _ in split} == {split[0][0]}
    assert [index for _, index in split] == [0, 1, 2, 3, 4]
    # Fewer keys of the same transfer are the first of them.
    assert relayed_key_ids(TRANSFER, PATH, 2) == ids[:2]
    assert len(relayed_key_ids(TRANSFER, PATH, 1)) == 1


@pytest.mark.parametrize(
    ("transfer", "path"),
    [
        (bytes(range(1, 17)), PATH),  # another transfer
        (TRANSFER, ("site-a", "site-d", "site-c")),  # another relay
        (TRANSFER, ("site-a", "site-c")),  # a shorter path
        (TRANSFER, ("site-c", "site-b", "site-a")),  # the same sites, reversed
        (TRANSFER, ("site-b", "site-a", "site-c")),  # the same sites, another order
        (TRANSFER, ("site-as", "ite-b", "site-c")),  # the same characters, cut elsewhere
        (TRANSFER[:15], PATH),  # a shorter transfer ID
    ],
)
def test_relayed_key_ids_differ_for_another_transfer_or_path(
    transfer: bytes, path: tuple[str, ...]
) -> None:
    ours, theirs = relayed_key_ids(TRANSFER, PATH, 2), relayed_key_ids(transfer, path, 2)
    assert not set(ours) & set(theirs)
    assert split_key_id(ours[0])[0] != split_key_id(theirs[0])[0]


@pytest.mark.parametrize(
    ("count", "path"), [(0, PATH), (-1, PATH), (MAX_INDEX + 2, PATH), (1, ()), (0, ())]
)
def test_relayed_key_ids_need_keys_and_a_path(count: int, path: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="1 or more keys and a path"):
        relayed_key_ids(TRANSFER, path, count)


# Computed once with qkdd.hybrid.relayed_key_ids(bytes(range(16)), ("site-a", "site-b",
# "site-c"), 2); the test below derives it again from the construction in that function's
# docstring with hashlib alone, so a change to either the code or the description shows.
RECORDED_FIRST_ID = "82e03a5a-a9cd-412e-9c5e-190700000000"
RECORDED_SECOND_ID = "82e03a5a-a9cd-412e-9c5e-190700000001"


def test_relayed_key_ids_match_the_recorded_vector() -> None:
    assert relayed_key_ids(TRANSFER, PATH, 2) == [RECORDED_FIRST_ID, RECORDED_SECOND_ID]


def test_the_recorded_vector_follows_the_documented_construction() -> None:
    # prefix = uuid_prefix(SHAKE-256(lp(LABEL_RELAYED_KEY_IDS) || lp(transfer_id)
    #                                || u8(len(path)) || lp(site) for each site, 12 bytes))
    # id_i   = UUID(prefix || u32(i))
    def lp(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    encoded = lp(labels.LABEL_RELAYED_KEY_IDS) + lp(TRANSFER) + bytes([len(PATH)])
    encoded += b"".join(lp(site.encode("ascii")) for site in PATH)
    prefix = bytearray(hashlib.shake_256(encoded).digest(12))
    prefix[6] = (prefix[6] & 0x0F) | 0x40  # version 4
    prefix[8] = (prefix[8] & 0x3F) | 0x80  # the RFC 9562 variant
    expected = [str(uuid.UUID(bytes=bytes(prefix) + struct.pack(">I", i))) for i in range(2)]
    assert expected == [RECORDED_FIRST_ID, RECORDED_SECOND_ID]
