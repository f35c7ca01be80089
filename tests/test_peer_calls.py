"""Peer calls, sans-IO: call bodies round-trip through their encodings, bad bodies are
refused, replies are matched to calls, and the largest message fits a session frame."""

from __future__ import annotations

import uuid

import pytest

from qkdd.crypto import AEAD_TAG_SIZE
from qkdd.peer.agreement_messages import CallReply, PeerCall, decode_message
from qkdd.peer.calls import (
    MAX_KEYS_PER_MESSAGE,
    CallRefused,
    CallTable,
    KeyAssign,
    KeyAssignment,
    Protection,
    SealedMessage,
    WgInstall,
    done,
    refusal,
    reply_body,
)
from qkdd.peer.peer_errors import RemoteProtocolError
from qkdd.peer.wire import MAX_SESSION_BODY


def uid() -> str:
    return str(uuid.uuid4())


def test_bodies_round_trip():
    assign = KeyAssign((KeyAssignment(uid(), 512, "sae-a", ("sae-b", "sae-c"), (uid(), uid())),))
    assert KeyAssign.decode(assign.encode()) == assign
    for protection, ids in ((Protection.HYBRID, (uid(),)), (Protection.OTP, (uid(), uid()))):
        message = SealedMessage(uid(), "sae-a", "sae-b", protection, ids, b"\x01" * 40)
        assert SealedMessage.decode(message.encode()) == message
    install = WgInstall("tunnel", uid())
    assert WgInstall.decode(install.encode()) == install


@pytest.mark.parametrize(
    "body",
    [
        KeyAssign((KeyAssignment(uid(), 12, "a", ("b",), (uid(),)),)).encode(),  # 12 bits
        KeyAssign((KeyAssignment(uid(), 256, "a", (), (uid(),)),)).encode(),  # no slave
        KeyAssign((KeyAssignment(uid(), 256, "a", ("b",), ()),)).encode(),  # no constituent
        KeyAssign(()).encode(),
        KeyAssign((KeyAssignment(uid(), 256, "a", ("b",), (uid(),)),)).encode() + b"x",
    ],
    # Named, not shown: the bodies hold random IDs, and test IDs must be the same in every
    # process that collects them (pytest-xdist workers).
    ids=["12-bits", "no-slave", "no-constituent", "empty", "trailing-byte"],
)
def test_bad_key_assignments_are_refused(body):
    with pytest.raises(RemoteProtocolError):
        KeyAssign.decode(body)


@pytest.mark.parametrize(
    ("protection", "count"), [(Protection.HYBRID, 2), (Protection.OTP, 0), (9, 1)]
)
def test_bad_messages_are_refused(protection, count):
    body = SealedMessage(uid(), "a", "b", protection, tuple(uid() for _ in range(count)), b"")
    with pytest.raises(RemoteProtocolError):
        SealedMessage.decode(body.encode())


def test_replies_are_matched_to_calls_once():
    table = CallTable()
    first, second = table.call(1, b"a"), table.call(2, b"b")
    assert first.call_id != second.call_id and table.open_calls == {1, 2}
    assert reply_body(table.on_reply(done(second, b"ok"))) == b"ok"
    with pytest.raises(CallRefused, match="no such thing"):
        reply_body(table.on_reply(refusal(first, "no such thing")))
    with pytest.raises(RemoteProtocolError):
        table.on_reply(done(first))  # answered already
    with pytest.raises(RemoteProtocolError):
        table.on_reply(CallReply(99, 0, b""))  # never made


def test_the_largest_message_fits_one_session_frame():
    # A 1 MiB one-time-pad message: 1025 pads of 1 KiB, and the 16-byte tag.
    pads = tuple(uid() for _ in range(1025))
    assert len(pads) <= MAX_KEYS_PER_MESSAGE
    sid = "s" * 64  # the longest SAE IDs
    message = SealedMessage(uid(), sid, sid, Protection.OTP, pads, bytes(1024 * 1024 + 16))
    call = PeerCall(7, 2, message.encode())
    payload = call.encode()
    assert len(payload) + AEAD_TAG_SIZE <= MAX_SESSION_BODY
    decoded = decode_message(payload)
    assert isinstance(decoded, PeerCall) and SealedMessage.decode(decoded.body) == message
