"""Link messages and frame decoding: round trips, and arbitrary bytes never crash a decoder."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdd.peer.agreement_messages import (
    MAX_KEYS_PER_BATCH,
    BatchAck,
    BatchDecision,
    BatchPurpose,
    KemOffer,
    KeyBatch,
    PoolDemand,
    QkdHorizon,
    Resync,
    StoreId,
    decode_message,
)
from qkdd.peer.connection import HandshakeResponse, Hello
from qkdd.peer.peer_errors import RemoteProtocolError
from qkdd.peer.wire import MAX_HANDSHAKE_BODY, FrameBuffer

FIRST = uuid.uuid4().bytes
EXAMPLES = [
    KemOffer(7, os.urandom(1184)),
    KeyBatch(
        1,
        7,
        BatchPurpose.APPLICATION_KEYS,
        os.urandom(1088),
        "sae-a",
        "sae-b",
        256,
        4096,
        uuid.uuid4().bytes,
        4096,
        os.urandom(32),
    ),
    KeyBatch(
        2,
        8,
        BatchPurpose.PADS,
        os.urandom(1088),
        "sae-b",
        "sae-a",
        8192,
        3,
        FIRST,
        4,
        os.urandom(32),
        (FIRST, *(uuid.uuid4().bytes for _ in range(3))),
    ),
    BatchAck(1, True),
    BatchAck(2, False, "device desync"),
    BatchDecision(3, True),
    PoolDemand((("sae-a", "sae-b", 12),)),
    Resync((1, 2, 3)),
    Resync(()),
    StoreId(b"\x07" * 16),
    QkdHorizon((str(uuid.uuid4()), str(uuid.uuid4()))),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert decode_message(message.encode()) == message


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_truncation_and_trailing_bytes_are_refused(message):
    data = message.encode()
    with pytest.raises(RemoteProtocolError):
        decode_message(data[:-1])
    with pytest.raises(RemoteProtocolError, match="trailing"):
        decode_message(data + b"\x00")


def test_unknown_type_and_empty_message():
    with pytest.raises(RemoteProtocolError, match="unknown"):
        decode_message(b"\x7f")
    with pytest.raises(RemoteProtocolError, match="empty"):
        decode_message(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_decode_message_never_crashes(data):
    with contextlib.suppress(RemoteProtocolError):
        decode_message(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=6000))
def test_handshake_decoders_never_crash(data):
    decoders = (
        Hello.decode,
        partial(HandshakeResponse.decode, auth_size=32),
        partial(HandshakeResponse.decode, auth_size=3309),
    )
    for decoder in decoders:
        with contextlib.suppress(RemoteProtocolError):
            decoder(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=512), max_size=20))
def test_frame_buffer_never_holds_more_than_the_cap(chunks):
    buffer = FrameBuffer()
    try:
        for chunk in chunks:
            buffer.feed(chunk)
            while buffer.next_frame() is not None:
                pass
            assert buffer.pending <= 6 + MAX_HANDSHAKE_BODY + 512
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"count": 0}, "0 keys"),
        ({"count": MAX_KEYS_PER_BATCH + 1}, "keys, allowed"),
        ({"size_bits": 12}, "not a multiple of 8"),
        ({"size_bits": 8192 + 8}, "not a multiple of 8"),
        ({"qkd_key_count": 0}, "0 QKD keys"),
        ({"qkd_key_ids": (FIRST,)}, "does not match its count"),
        ({"qkd_key_count": 2, "qkd_key_ids": (uuid.uuid4().bytes, FIRST)}, "does not start"),
    ],
)
def test_a_key_batch_out_of_bounds_is_refused(change, complaint):
    batch = dataclasses.replace(EXAMPLES[1], **change)
    with pytest.raises(RemoteProtocolError, match=complaint):
        decode_message(batch.encode())
