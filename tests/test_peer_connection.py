"""The handshake and session state machine, driven sans-IO: two PeerConnections in memory."""

from __future__ import annotations

import contextlib

import pytest

from qkdd.crypto import SIGNATURE_SIZE
from qkdd.peer.connection import (
    HandshakeComplete,
    MessageReceived,
    PeerConnection,
    Role,
    State,
)
from qkdd.peer.errors import LocalProtocolError, PeerAuthenticationError, RemoteProtocolError
from qkdd.peer.wire import FRAME_HEADER, MAX_HANDSHAKE_BODY, FrameType, make_frame


def make_pair(
    backend, identities, *, responder_pins=None, initiator_pins=None, initiator_key="site-a"
):
    pins = {site: key.public_bytes for site, key in identities.items() if site != "mallory"}
    initiator = PeerConnection(
        Role.INITIATOR,
        backend=backend,
        local_site_id="site-a",
        signing_key=identities[initiator_key],
        pinned_key=(initiator_pins or pins).get,
        expected_peer="site-b",
    )
    responder = PeerConnection(
        Role.RESPONDER,
        backend=backend,
        local_site_id="site-b",
        signing_key=identities["site-b"],
        pinned_key=(responder_pins or pins).get,
    )
    return initiator, responder


def handshake(initiator, responder):
    initiator.initiate()
    hello = initiator.data_to_send()
    assert responder.receive_data(hello) == []
    response = responder.data_to_send()
    events_i = initiator.receive_data(response)
    finish = initiator.data_to_send()
    events_r = responder.receive_data(finish)
    return hello, response, finish, events_i, events_r


def test_both_ends_agree_on_session_and_exchange_messages(backend, identities):
    initiator, responder = make_pair(backend, identities)
    _, _, _, events_i, events_r = handshake(initiator, responder)
    assert events_i == [HandshakeComplete("site-b", initiator.session_id)]
    assert events_r == [HandshakeComplete("site-a", responder.session_id)]
    assert initiator.session_id == responder.session_id
    assert initiator.state is responder.state is State.ESTABLISHED

    initiator.send_message(b"to b")
    responder.send_message(b"to a")
    assert responder.receive_data(initiator.data_to_send()) == [MessageReceived(b"to b")]
    assert initiator.receive_data(responder.data_to_send()) == [MessageReceived(b"to a")]


def test_bytes_may_arrive_one_at_a_time(backend, identities):
    initiator, responder = make_pair(backend, identities)
    initiator.initiate()
    hello = initiator.data_to_send()
    for byte in hello:
        assert responder.receive_data(bytes([byte])) == []
    events = []
    for byte in responder.data_to_send():
        events += initiator.receive_data(bytes([byte]))
    assert [type(e) for e in events] == [HandshakeComplete]


def test_wrong_pinned_key_fails_the_initiator(backend, identities):
    wrong = {
        "site-b": identities["mallory"].public_bytes,
        "site-a": identities["site-a"].public_bytes,
    }
    initiator, responder = make_pair(backend, identities, initiator_pins=wrong)
    initiator.initiate()
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(
        PeerAuthenticationError, match="does not verify under the pinned public key"
    ):
        initiator.receive_data(responder.data_to_send())
    assert initiator.state is State.CLOSED
    assert initiator.data_to_send() == b""  # no FINISH: nothing of ours leaks past the failure


def test_impostor_initiator_is_rejected_by_responder(backend, identities):
    initiator, responder = make_pair(backend, identities, initiator_key="mallory")
    initiator.initiate()
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    with pytest.raises(PeerAuthenticationError, match="site-a"):
        responder.receive_data(initiator.data_to_send())
    assert responder.state is State.CLOSED


def test_unknown_site_is_refused_before_any_signature(backend, identities):
    initiator, responder = make_pair(backend, identities, responder_pins={"site-c": b"x"})
    initiator.initiate()
    with pytest.raises(PeerAuthenticationError, match="not a configured peer"):
        responder.receive_data(initiator.data_to_send())
    assert responder.data_to_send() == b""


@pytest.mark.parametrize("target", ["hello", "response", "finish"])
def test_any_flipped_bit_in_the_handshake_fails(backend, identities, target):
    initiator, responder = make_pair(backend, identities)
    initiator.initiate()
    hello = bytearray(initiator.data_to_send())
    if target == "hello":
        hello[40] ^= 1  # inside the nonce: the transcript hash changes
    responder.receive_data(bytes(hello))
    response = bytearray(responder.data_to_send())
    if target == "response":
        response[-SIGNATURE_SIZE - 5] ^= 1  # inside the X25519 share
    expect_failure = target != "finish"
    with pytest.raises(PeerAuthenticationError) if expect_failure else contextlib.nullcontext():
        initiator.receive_data(bytes(response))
    if target == "finish":
        finish = bytearray(initiator.data_to_send())
        finish[-1] ^= 1  # inside the key confirmation MAC
        with pytest.raises(PeerAuthenticationError):
            responder.receive_data(bytes(finish))


def test_session_frames_replayed_reordered_or_tampered_fail(backend, identities):
    initiator, responder = make_pair(backend, identities)
    handshake(initiator, responder)
    initiator.send_message(b"one")
    first = initiator.data_to_send()
    initiator.send_message(b"two")
    second = initiator.data_to_send()
    assert responder.receive_data(first) == [MessageReceived(b"one")]
    with pytest.raises(PeerAuthenticationError, match="replayed"):
        responder.receive_data(first)  # replay

    initiator2, responder2 = make_pair(backend, identities)
    handshake(initiator2, responder2)
    initiator2.send_message(b"one")
    a = initiator2.data_to_send()
    initiator2.send_message(b"two")
    b = initiator2.data_to_send()
    with pytest.raises(PeerAuthenticationError):
        responder2.receive_data(b + a)  # reordered
    assert second  # the original second frame was produced


def test_reflected_frame_fails(backend, identities):
    initiator, responder = make_pair(backend, identities)
    handshake(initiator, responder)
    initiator.send_message(b"ping")
    frame = initiator.data_to_send()
    with pytest.raises(PeerAuthenticationError):
        initiator.receive_data(frame)  # our own frame sent back to us


def test_out_of_order_handshake_messages_are_refused(backend, identities):
    initiator, responder = make_pair(backend, identities)
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        responder.receive_data(make_frame(FrameType.FINISH, b"x").encode())
    initiator.initiate()
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        initiator.receive_data(make_frame(FrameType.HELLO, b"x").encode())


def test_data_before_handshake_is_refused(backend, identities):
    _, responder = make_pair(backend, identities)
    with pytest.raises(RemoteProtocolError):
        responder.receive_data(make_frame(FrameType.DATA, b"\x00" * 32).encode())


def test_oversized_frame_is_refused_from_its_header(backend, identities):
    _, responder = make_pair(backend, identities)
    header = FRAME_HEADER.pack(1, FrameType.HELLO, MAX_HANDSHAKE_BODY + 1)
    with pytest.raises(RemoteProtocolError, match="exceeds the cap"):
        responder.receive_data(header)


def test_version_downgrade_is_refused(backend, identities):
    initiator, responder = make_pair(backend, identities)
    initiator.initiate()
    hello = bytearray(initiator.data_to_send())
    hello[7] = 0  # the single offered version becomes 0
    with pytest.raises(RemoteProtocolError, match="versions"):
        responder.receive_data(bytes(hello))


def test_local_misuse_raises_local_errors(backend, identities):
    initiator, responder = make_pair(backend, identities)
    with pytest.raises(LocalProtocolError):
        initiator.send_message(b"too early")
    with pytest.raises(LocalProtocolError):
        responder.initiate()
    with pytest.raises(LocalProtocolError):
        PeerConnection(
            Role.INITIATOR,
            backend=backend,
            local_site_id="a",
            signing_key=identities["site-a"],
            pinned_key={}.get,
        )


def test_secrets_not_in_repr(backend, identities):
    initiator, responder = make_pair(backend, identities)
    handshake(initiator, responder)
    assert "(secret hidden)" in repr(identities["site-a"])
    text = repr(initiator)
    for secret_holder in (initiator._send, initiator._recv):
        assert "hidden" in repr(secret_holder)
    assert "key=" not in text and "b'" not in text
