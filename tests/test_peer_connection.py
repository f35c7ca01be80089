"""The handshake and session state machine, driven sans-IO: two PeerConnections in memory."""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

from qkdd.crypto import SIGNATURE_SIZE
from qkdd.peer.connection import (
    MODE_PSK,
    MODE_SIGNATURE_BOOTSTRAP,
    AuthKey,
    HandshakeComplete,
    MessageReceived,
    PeerConnection,
    Role,
    State,
)
from qkdd.peer.peer_errors import LocalProtocolError, PeerAuthenticationError, RemoteProtocolError
from qkdd.peer.wire import (
    FRAME_HEADER,
    MAX_HANDSHAKE_BODY,
    MAX_SESSION_BODY,
    PROTOCOL_VERSION,
    FrameBuffer,
    FrameType,
    make_frame,
)


class Trust:
    """An in-memory PeerTrust: pinned keys, bootstrap permission, PSKs by ID."""

    def __init__(self, pins, *, bootstrap=True, psks=None):
        self.pins = pins
        self.bootstrap = bootstrap
        self.psks = psks or {}

    def pinned_key(self, site_id):
        return self.pins.get(site_id)

    def bootstrap_allowed(self, site_id):
        return self.bootstrap

    def auth_key(self, site_id, key_id):
        return self.psks.get(key_id)


def make_pair(
    backend,
    identities,
    *,
    responder_pins=None,
    initiator_pins=None,
    initiator_key="site-a",
    psk=None,
    responder_psks=None,
    bootstrap=True,
):
    pins = {site: key.public_bytes for site, key in identities.items() if site != "mallory"}
    initiator = PeerConnection(
        Role.INITIATOR,
        backend=backend,
        local_site_id="site-a",
        signing_key=identities[initiator_key],
        trust=Trust(initiator_pins or pins),
        expected_peer="site-b",
        auth_key=psk,
    )
    if responder_psks is None and psk is not None:
        responder_psks = {psk.key_id: psk.material}
    responder = PeerConnection(
        Role.RESPONDER,
        backend=backend,
        local_site_id="site-b",
        signing_key=identities["site-b"],
        trust=Trust(responder_pins or pins, bootstrap=bootstrap, psks=responder_psks),
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
    assert events_i == [
        HandshakeComplete("site-b", initiator.session_id, MODE_SIGNATURE_BOOTSTRAP, None)
    ]
    assert events_r == [
        HandshakeComplete("site-a", responder.session_id, MODE_SIGNATURE_BOOTSTRAP, None)
    ]
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
    header = FRAME_HEADER.pack(PROTOCOL_VERSION, FrameType.HELLO, MAX_HANDSHAKE_BODY + 1)
    with pytest.raises(RemoteProtocolError, match="exceeds the cap"):
        responder.receive_data(header)


def test_version_downgrade_is_refused(backend, identities):
    initiator, responder = make_pair(backend, identities)
    initiator.initiate()
    hello = bytearray(initiator.data_to_send())
    hello[7] = 0  # the single offered version becomes 0
    with pytest.raises(RemoteProtocolError, match="speaks qkdd peer protocol version 0"):
        responder.receive_data(bytes(hello))


def test_a_peer_of_the_previous_version_is_told_both_versions(backend, identities):
    initiator, responder = make_pair(backend, identities)
    initiator.initiate()
    hello = bytearray(initiator.data_to_send())
    hello[0] = PROTOCOL_VERSION - 1  # the frame header of a daemon one version older
    with pytest.raises(RemoteProtocolError) as raised:
        responder.receive_data(bytes(hello))
    message = str(raised.value)
    assert f"version {PROTOCOL_VERSION - 1}" in message
    assert f"speaks version {PROTOCOL_VERSION}" in message
    assert "same qkdd release" in message


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
            trust=Trust({}),
        )


def test_secrets_not_in_repr(backend, identities):
    initiator, responder = make_pair(backend, identities)
    handshake(initiator, responder)
    assert "(secret hidden)" in repr(identities["site-a"])
    text = repr(initiator)
    for secret_holder in (initiator._send, initiator._recv):
        assert "hidden" in repr(secret_holder)
    assert "key=" not in text and "b'" not in text


# -- PSK mode -----------------------------------------------------------------------------

PSK = AuthKey(str(uuid.uuid4()), os.urandom(32))


class CountingBackend:
    """Wraps the real backend and counts ML-DSA work, to show mode 2 does none."""

    def __init__(self, backend):
        self._backend = backend
        self.verifies = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def verify(self, *args):
        self.verifies += 1
        return self._backend.verify(*args)


def test_psk_handshake_agrees_without_signatures(backend, identities):
    counting = CountingBackend(backend)
    initiator, responder = make_pair(counting, identities, psk=PSK, bootstrap=False)
    _, _, finish, events_i, events_r = handshake(initiator, responder)
    assert events_i == [HandshakeComplete("site-b", initiator.session_id, MODE_PSK, PSK.key_id)]
    assert events_r == [HandshakeComplete("site-a", responder.session_id, MODE_PSK, PSK.key_id)]
    assert initiator.session_id == responder.session_id
    assert counting.verifies == 0
    assert len(finish) < 200  # a MAC, not a 3309-byte signature
    initiator.send_message(b"hi")
    assert responder.receive_data(initiator.data_to_send()) == [MessageReceived(b"hi")]


def test_psk_the_responder_does_not_hold_fails_closed(backend, identities):
    initiator, responder = make_pair(backend, identities, psk=PSK, responder_psks={})
    initiator.initiate()
    with pytest.raises(PeerAuthenticationError, match="out of step"):
        responder.receive_data(initiator.data_to_send())
    assert responder.data_to_send() == b""


def test_wrong_psk_fails_both_ways(backend, identities):
    other = {PSK.key_id: os.urandom(32)}
    initiator, responder = make_pair(backend, identities, psk=PSK, responder_psks=other)
    initiator.initiate()
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(PeerAuthenticationError, match="MAC under authentication key"):
        initiator.receive_data(responder.data_to_send())


def test_bootstrap_refused_once_the_psk_chain_exists(backend, identities):
    initiator, responder = make_pair(backend, identities, bootstrap=False)
    initiator.initiate()
    with pytest.raises(PeerAuthenticationError, match="allow-bootstrap"):
        responder.receive_data(initiator.data_to_send())


def test_downgrade_from_psk_to_signature_mode_is_refused(backend, identities):
    """A man in the middle rewriting HELLO's mode meets the responder's refusal."""
    initiator, responder = make_pair(backend, identities, psk=PSK, bootstrap=False)
    initiator.initiate()
    hello = bytearray(initiator.data_to_send())
    mode_offset = 6 + 1 + 1  # header, version count, one version
    assert hello[mode_offset] == MODE_PSK
    hello[mode_offset] = MODE_SIGNATURE_BOOTSTRAP
    del hello[mode_offset + 1 + 1 + 6 + 1 + 6 : mode_offset + 1 + 1 + 6 + 1 + 6 + 16]  # the PSK ID
    hello[2:6] = (len(hello) - 6).to_bytes(4, "big")
    with pytest.raises(PeerAuthenticationError, match="allow-bootstrap"):
        responder.receive_data(bytes(hello))


def test_psk_mode_reflection_fails(backend, identities):
    """The responder's MAC sent back as the initiator's does not verify (per-role keys)."""
    initiator, responder = make_pair(backend, identities, psk=PSK)
    initiator.initiate()
    responder.receive_data(initiator.data_to_send())
    response = responder.data_to_send()
    initiator.receive_data(response)
    finish = bytearray(initiator.data_to_send())
    responder_mac = response[-32:]
    finish[6 : 6 + 32] = responder_mac
    with pytest.raises(PeerAuthenticationError):
        responder.receive_data(bytes(finish))


# -- rekeying ------------------------------------------------------------------------------


def test_key_update_on_demand_keeps_the_session_and_drops_old_frames(backend, identities):
    initiator, responder = make_pair(backend, identities)
    handshake(initiator, responder)
    initiator.send_message(b"before")
    before = initiator.data_to_send()
    assert responder.receive_data(before) == [MessageReceived(b"before")]
    initiator.update_send_key()
    initiator.send_message(b"after")
    assert responder.receive_data(initiator.data_to_send()) == [MessageReceived(b"after")]
    assert responder._recv.counter == 1  # counters restart with the new key
    with pytest.raises(PeerAuthenticationError):
        responder.receive_data(before)  # a frame under the old key is now a replay


def test_key_update_by_volume(backend, identities):
    pins = {site: key.public_bytes for site, key in identities.items()}
    initiator = PeerConnection(
        Role.INITIATOR,
        backend=backend,
        local_site_id="site-a",
        signing_key=identities["site-a"],
        trust=Trust(pins),
        expected_peer="site-b",
        rekey_after_frames=3,
    )
    responder = PeerConnection(
        Role.RESPONDER,
        backend=backend,
        local_site_id="site-b",
        signing_key=identities["site-b"],
        trust=Trust(pins),
    )
    handshake(initiator, responder)
    for i in range(10):
        initiator.send_message(bytes([i]))
    data = initiator.data_to_send()
    frames = FrameBuffer()
    frames.max_body = MAX_SESSION_BODY
    frames.feed(data)
    types = []
    while (frame := frames.next_frame()) is not None:
        types.append(frame.type)
    assert types.count(FrameType.KEY_UPDATE) == 3  # after frames 3, 6 and 9
    assert len(types) == 13
    assert responder.receive_data(data) == [MessageReceived(bytes([i])) for i in range(10)]


def test_dropping_a_key_update_breaks_the_session(backend, identities):
    initiator, responder = make_pair(backend, identities)
    handshake(initiator, responder)
    initiator.update_send_key()
    initiator.data_to_send()  # lost
    initiator.send_message(b"x")
    with pytest.raises(PeerAuthenticationError):
        responder.receive_data(initiator.data_to_send())


def test_key_update_before_the_handshake_is_refused(backend, identities):
    initiator, responder = make_pair(backend, identities)
    with pytest.raises(LocalProtocolError):
        initiator.update_send_key()
    with pytest.raises(RemoteProtocolError):
        responder.receive_data(make_frame(FrameType.KEY_UPDATE, b"\x00" * 16).encode())
