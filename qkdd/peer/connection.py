"""One peer connection as a sans-IO state machine: the bootstrap handshake, then a session
of AEAD-sealed frames. Bytes go in through ``receive_data``, events come out; bytes to send
are collected with ``data_to_send``. No sockets, no clock, no trio.

Theory of operation (bootstrap, mutual ML-DSA-65 authentication):

    initiator                                             responder
    HELLO    versions, mode, ids, nonce_i, ek_i, x_i  -->
                                                      <-- RESPONSE version, id, nonce_r,
                                                          ct (ML-KEM to ek_i), x_r,
                                                          sig_r(transcript)
    FINISH   sig_i(transcript), confirm MAC          -->
    DATA ...                                         <->  DATA ...

The transcript hash covers every byte of HELLO and RESPONSE (the responder's signature
covers HELLO and RESPONSE up to the signature; the initiator's covers all of both), so
version and algorithm negotiation, both site IDs, both nonces and every key share are
authenticated: a downgrade or a substituted share breaks a signature. Signature contexts
differ per role, so a reflected signature never verifies. The session keys come from
HKDF over the ML-KEM and X25519 shared secrets salted with the transcript hash: the
session is secret if either ML-KEM-768 or X25519 holds.

Session frames carry no explicit sequence number: the AEAD nonce is a per-direction
counter, so a replayed, reordered, dropped or injected frame fails authentication.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from qkdd import labels
from qkdd.crypto import (
    AEAD_TAG_SIZE,
    HASH_SIZE,
    KEM_CIPHERTEXT_SIZE,
    KEM_PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    X25519_KEY_SIZE,
    Aead,
    AuthenticationFailed,
    CryptoError,
    PqcBackend,
    SigningKey,
    X25519KeyPair,
    constant_time_equal,
    hkdf_expand,
    hkdf_extract,
    mac,
)
from qkdd.peer.errors import (
    LocalProtocolError,
    PeerAuthenticationError,
    RemoteProtocolError,
)
from qkdd.peer.wire import (
    MAX_SESSION_BODY,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Frame,
    FrameBuffer,
    FrameType,
    Reader,
    Writer,
    make_frame,
)

MODE_SIGNATURE_BOOTSTRAP = 1
SUPPORTED_MODES = (MODE_SIGNATURE_BOOTSTRAP,)


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(enum.Enum):
    START = "start"
    SENT_HELLO = "sent hello"
    WAIT_HELLO = "wait hello"
    SENT_RESPONSE = "sent response"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True)
class HandshakeComplete:
    peer_site_id: str
    session_id: bytes


@dataclass(frozen=True)
class MessageReceived:
    payload: bytes = field(repr=False)


Event = HandshakeComplete | MessageReceived

# The transition table: which frame is acceptable in which state, and what handles it.
# Anything else is a RemoteProtocolError and closes the connection.
_TRANSITIONS: dict[tuple[Role, State, int], str] = {
    (Role.INITIATOR, State.SENT_HELLO, FrameType.RESPONSE): "_on_response",
    (Role.RESPONDER, State.WAIT_HELLO, FrameType.HELLO): "_on_hello",
    (Role.RESPONDER, State.SENT_RESPONSE, FrameType.FINISH): "_on_finish",
    (Role.INITIATOR, State.ESTABLISHED, FrameType.DATA): "_on_data",
    (Role.RESPONDER, State.ESTABLISHED, FrameType.DATA): "_on_data",
}


@dataclass(frozen=True)
class Hello:
    versions: tuple[int, ...]
    mode: int
    initiator_id: str
    responder_id: str
    nonce: bytes
    kem_public_key: bytes
    x25519_public: bytes

    def encode(self) -> bytes:
        w = Writer().u8(len(self.versions))
        for version in self.versions:
            w.u8(version)
        return (
            w.u8(self.mode)
            .text(self.initiator_id)
            .text(self.responder_id)
            .fixed(self.nonce, NONCE_SIZE)
            .fixed(self.kem_public_key, KEM_PUBLIC_KEY_SIZE)
            .fixed(self.x25519_public, X25519_KEY_SIZE)
            .build()
        )

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        r = Reader(body, "HELLO")
        count = r.u8()
        if not 1 <= count <= 16:
            raise RemoteProtocolError("HELLO: bad version list")
        versions = tuple(r.u8() for _ in range(count))
        hello = cls(
            versions,
            r.u8(),
            r.text(),
            r.text(),
            r.fixed(NONCE_SIZE),
            r.fixed(KEM_PUBLIC_KEY_SIZE),
            r.fixed(X25519_KEY_SIZE),
        )
        r.end()
        return hello


@dataclass(frozen=True)
class Response:
    version: int
    responder_id: str
    nonce: bytes
    kem_ciphertext: bytes
    x25519_public: bytes

    def encode_unsigned(self) -> bytes:
        return (
            Writer()
            .u8(self.version)
            .text(self.responder_id)
            .fixed(self.nonce, NONCE_SIZE)
            .fixed(self.kem_ciphertext, KEM_CIPHERTEXT_SIZE)
            .fixed(self.x25519_public, X25519_KEY_SIZE)
            .build()
        )

    @classmethod
    def decode(cls, body: bytes) -> tuple[Response, bytes, bytes]:
        """Return the response, the signed part of the body, and the signature."""
        r = Reader(body, "RESPONSE")
        response = cls(
            r.u8(),
            r.text(),
            r.fixed(NONCE_SIZE),
            r.fixed(KEM_CIPHERTEXT_SIZE),
            r.fixed(X25519_KEY_SIZE),
        )
        signed = body[: r.consumed]
        signature = r.fixed(SIGNATURE_SIZE)
        r.end()
        return response, signed, signature


class PeerConnection:
    """One end of a peer connection.

    ``pinned_key(site_id)`` returns the pinned ML-DSA-65 public key of a configured peer
    site, or None for a site we do not know. An initiator names the site it expects.
    """

    def __init__(
        self,
        role: Role,
        *,
        backend: PqcBackend,
        local_site_id: str,
        signing_key: SigningKey,
        pinned_key: Callable[[str], bytes | None],
        expected_peer: str | None = None,
    ) -> None:
        if role is Role.INITIATOR and expected_peer is None:
            raise LocalProtocolError("an initiator must name the peer site it expects")
        self.role = role
        self.state = State.START if role is Role.INITIATOR else State.WAIT_HELLO
        self.peer_site_id = expected_peer
        self.session_id: bytes | None = None
        self._backend = backend
        self._local_id = local_site_id
        self._signing_key = signing_key
        self._pinned_key = pinned_key
        self._frames = FrameBuffer()
        self._outgoing = bytearray()
        self._transcript = hashlib.sha256(labels.PROTOCOL_NAME)
        self._kem_key = None
        self._x25519: X25519KeyPair | None = None
        self._hello: Hello | None = None
        self._shared: bytes | None = None
        self._send: Aead | None = None
        self._recv: Aead | None = None
        self._send_counter = 0
        self._recv_counter = 0

    def __repr__(self) -> str:
        return (
            f"<PeerConnection {self.role.value} {self._local_id}->{self.peer_site_id} "
            f"{self.state.value}>"
        )

    # -- public API -----------------------------------------------------------------------

    def initiate(self) -> None:
        if self.role is not Role.INITIATOR or self.state is not State.START:
            raise LocalProtocolError(f"cannot initiate in state {self.state.value}")
        assert self.peer_site_id is not None
        self._kem_key = self._backend.kem_generate()
        self._x25519 = X25519KeyPair()
        hello = Hello(
            SUPPORTED_VERSIONS,
            MODE_SIGNATURE_BOOTSTRAP,
            self._local_id,
            self.peer_site_id,
            os.urandom(NONCE_SIZE),
            self._kem_key.public_bytes,
            self._x25519.public_bytes,
        )
        self._hello = hello
        self._emit(make_frame(FrameType.HELLO, hello.encode()))
        self.state = State.SENT_HELLO

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return the events they complete.

        Raises a RemoteProtocolError (or PeerAuthenticationError) on any bad input, after
        which the connection is CLOSED and must be dropped.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        events: list[Event] = []
        try:
            self._frames.feed(data)
            while (frame := self._frames.next_frame()) is not None:
                handler = _TRANSITIONS.get((self.role, self.state, frame.type))
                if handler is None:
                    raise RemoteProtocolError(
                        f"unexpected frame type 0x{frame.type:02x} in state {self.state.value}"
                    )
                event = getattr(self, handler)(frame)
                if event is not None:
                    events.append(event)
        except (RemoteProtocolError, CryptoError) as exc:
            self.state = State.CLOSED
            if isinstance(exc, RemoteProtocolError):
                raise
            raise PeerAuthenticationError(str(exc)) from None
        return events

    def send_message(self, payload: bytes) -> None:
        if self.state is not State.ESTABLISHED or self._send is None:
            raise LocalProtocolError(f"cannot send in state {self.state.value}")
        if len(payload) + AEAD_TAG_SIZE > MAX_SESSION_BODY:
            raise LocalProtocolError("message exceeds the session frame cap")
        length = len(payload) + AEAD_TAG_SIZE
        header = make_frame(FrameType.DATA, b"").header[:2] + length.to_bytes(4, "big")
        sealed = self._send.seal(self._nonce(self._send_counter), payload, header)
        self._send_counter += 1
        self._outgoing += header + sealed

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    # -- handshake ------------------------------------------------------------------------

    def _emit(self, frame: Frame) -> None:
        if self.state is not State.ESTABLISHED:
            self._transcript.update(frame.encode())
        self._outgoing += frame.encode()

    def _on_hello(self, frame: Frame) -> None:
        hello = Hello.decode(frame.body)
        if PROTOCOL_VERSION not in hello.versions:
            raise RemoteProtocolError(
                f"peer offers versions {hello.versions}, we need {PROTOCOL_VERSION}"
            )
        if hello.mode not in SUPPORTED_MODES:
            raise RemoteProtocolError(f"unsupported handshake mode {hello.mode}")
        if hello.responder_id != self._local_id:
            raise PeerAuthenticationError(
                f"peer {hello.initiator_id!r} wants site {hello.responder_id!r}, "
                f"we are {self._local_id!r}"
            )
        # Unknown sites are refused before any signing work is done for them.
        if self._pinned_key(hello.initiator_id) is None:
            raise PeerAuthenticationError(f"site {hello.initiator_id!r} is not a configured peer")
        self.peer_site_id = hello.initiator_id
        self._hello = hello
        self._transcript.update(frame.encode())

        kem_secret, ciphertext = self._backend.kem_encapsulate(hello.kem_public_key)
        x25519 = X25519KeyPair()
        x_secret = x25519.exchange(hello.x25519_public)
        response = Response(
            PROTOCOL_VERSION,
            self._local_id,
            os.urandom(NONCE_SIZE),
            ciphertext,
            x25519.public_bytes,
        )
        unsigned = response.encode_unsigned()
        length = len(unsigned) + SIGNATURE_SIZE
        header = make_frame(FrameType.RESPONSE, b"").header[:2] + length.to_bytes(4, "big")
        signed_hash = self._transcript.copy()
        signed_hash.update(header + unsigned)
        signature = self._signing_key.sign(signed_hash.digest(), labels.SIG_CONTEXT_RESPONDER)
        self._emit(Frame(FrameType.RESPONSE, header, unsigned + signature))
        self._shared = kem_secret + x_secret
        self.state = State.SENT_RESPONSE

    def _on_response(self, frame: Frame) -> Event:
        response, signed, signature = Response.decode(frame.body)
        if response.version not in SUPPORTED_VERSIONS:
            raise RemoteProtocolError(f"peer chose version {response.version} we did not offer")
        if response.responder_id != self.peer_site_id:
            raise PeerAuthenticationError(
                f"expected site {self.peer_site_id!r}, peer says it is {response.responder_id!r}"
            )
        signed_hash = self._transcript.copy()
        signed_hash.update(frame.header + signed)
        pinned = self._pinned_key(response.responder_id)
        if pinned is None:
            raise PeerAuthenticationError(f"no pinned key for site {response.responder_id!r}")
        try:
            self._backend.verify(
                pinned, signed_hash.digest(), signature, labels.SIG_CONTEXT_RESPONDER
            )
        except AuthenticationFailed:
            raise PeerAuthenticationError(
                f"site {response.responder_id!r} failed authentication: its ML-DSA-65 signature "
                "does not verify under the pinned public key"
            ) from None
        self._transcript.update(frame.encode())
        assert self._kem_key is not None and self._x25519 is not None
        kem_secret = self._kem_key.decapsulate(response.kem_ciphertext)
        x_secret = self._x25519.exchange(response.x25519_public)
        self._shared = kem_secret + x_secret

        transcript = self._transcript.digest()
        signature_i = self._signing_key.sign(transcript, labels.SIG_CONTEXT_INITIATOR)
        confirm = mac(self._key(labels.LABEL_INITIATOR_CONFIRM, transcript), transcript)
        self._emit(make_frame(FrameType.FINISH, signature_i + confirm))
        return self._establish(transcript)

    def _on_finish(self, frame: Frame) -> Event:
        r = Reader(frame.body, "FINISH")
        signature, confirm = r.fixed(SIGNATURE_SIZE), r.fixed(HASH_SIZE)
        r.end()
        transcript = self._transcript.digest()
        assert self.peer_site_id is not None
        pinned = self._pinned_key(self.peer_site_id)
        assert pinned is not None
        try:
            self._backend.verify(pinned, transcript, signature, labels.SIG_CONTEXT_INITIATOR)
        except AuthenticationFailed:
            raise PeerAuthenticationError(
                f"site {self.peer_site_id!r} failed authentication: its ML-DSA-65 signature "
                "does not verify under the pinned public key"
            ) from None
        expected = mac(self._key(labels.LABEL_INITIATOR_CONFIRM, transcript), transcript)
        if not constant_time_equal(confirm, expected):
            raise PeerAuthenticationError("key confirmation failed")
        self._transcript.update(frame.encode())
        return self._establish(transcript)

    def _key(self, label: bytes, transcript: bytes) -> bytes:
        assert self._shared is not None
        secret = hkdf_extract(transcript, labels.LABEL_HANDSHAKE_SECRET + self._shared)
        return hkdf_expand(secret, label, 32)

    def _establish(self, transcript: bytes) -> HandshakeComplete:
        i2r = Aead(self._key(labels.LABEL_SESSION_INITIATOR_TO_RESPONDER, transcript))
        r2i = Aead(self._key(labels.LABEL_SESSION_RESPONDER_TO_INITIATOR, transcript))
        self._send, self._recv = (i2r, r2i) if self.role is Role.INITIATOR else (r2i, i2r)
        self._shared = None  # only the directional keys outlive the handshake
        self._kem_key = None
        self._x25519 = None
        self.session_id = hashlib.sha256(labels.LABEL_SESSION_ID + transcript).digest()
        self.state = State.ESTABLISHED
        self._frames.max_body = MAX_SESSION_BODY
        assert self.peer_site_id is not None
        return HandshakeComplete(self.peer_site_id, self.session_id)

    # -- session --------------------------------------------------------------------------

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return bytes(4) + counter.to_bytes(8, "big")

    def _on_data(self, frame: Frame) -> Event:
        assert self._recv is not None
        try:
            payload = self._recv.open(self._nonce(self._recv_counter), frame.body, frame.header)
        except AuthenticationFailed:
            raise PeerAuthenticationError(
                "session frame failed authentication (tampered, replayed, reordered or injected)"
            ) from None
        self._recv_counter += 1
        return MessageReceived(payload)
