"""One peer connection as a sans-IO state machine: the handshake, then a session of
AEAD-sealed frames. Bytes go in through ``receive_data``, events come out; bytes to send
are collected with ``data_to_send``. No sockets, no clock, no trio.

Theory of operation. Two handshake modes share one message flow:

    initiator                                             responder
    HELLO    versions, mode, ids, [psk id], nonce_i,
             ek_i, x_i                               -->
                                                      <-- RESPONSE version, id, nonce_r,
                                                          ct (ML-KEM to ek_i), x_r, auth_r
    FINISH   auth_i, confirm MAC                     -->
    DATA ...                                         <->  DATA ...

- Mode 1, bootstrap: ``auth`` is an ML-DSA-65 signature checked against the peer's pinned
  public key. Used for first contact only; once the sites share an authentication key
  (a PSK from the QKD stream) a responder refuses mode 1 unless the operator allowed a new
  bootstrap (see docs/protocol.md for why).
- Mode 2, PSK: ``auth`` is HMAC-SHA256 under a per-role key derived from the named
  authentication key. No signature is computed or checked.

The responder's ``auth`` covers HELLO and RESPONSE up to ``auth``; the initiator's covers
all of both. So version, mode, both site IDs, the PSK ID, both nonces and every key share
are authenticated: a downgrade or a substituted share breaks ``auth``. Per-role contexts
and keys mean a reflected ``auth`` never verifies. Session keys come from HKDF over the
ML-KEM and X25519 shared secrets (and the PSK in mode 2) salted with the transcript hash:
the session is secret if any one of them holds.

Session frames carry no explicit sequence number: the AEAD nonce is a per-direction
counter, so a replayed, reordered, dropped or injected frame fails authentication.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Protocol

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
    KemPrivateKey,
    PqcBackend,
    SigningKey,
    X25519KeyPair,
    constant_time_equal,
    hkdf_expand,
    hkdf_extract,
    mac,
)
from qkdd.peer.peer_errors import (
    LocalProtocolError,
    PeerAuthenticationError,
    RemoteProtocolError,
    VersionMismatch,
)
from qkdd.peer.randomness import SYSTEM_RANDOMNESS, Randomness
from qkdd.peer.wire import (
    FRAME_HEADER,
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
    version_mismatch,
)

MODE_SIGNATURE_BOOTSTRAP = 1
MODE_PSK = 2
SUPPORTED_MODES = (MODE_SIGNATURE_BOOTSTRAP, MODE_PSK)
PSK_ID_SIZE = 16  # a UUID
# Rekey by volume: a direction moves to a new key after this many frames (well below the
# 2^32 messages ChaCha20-Poly1305 is comfortable with per key). The I/O layer adds a timer.
REKEY_AFTER_FRAMES = 1 << 20
MAC_SIZE = HASH_SIZE
_AUTH_SIZE = {MODE_SIGNATURE_BOOTSTRAP: SIGNATURE_SIZE, MODE_PSK: MAC_SIZE}


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
class AuthKey:
    """A pre-shared authentication key taken from the QKD stream."""

    key_id: str
    material: bytes = field(repr=False)


@dataclass(frozen=True)
class HandshakeComplete:
    peer_site_id: str
    session_id: bytes
    mode: int
    auth_key_id: str | None  # the PSK used (mode 2), None for a bootstrap


@dataclass(frozen=True)
class MessageReceived:
    payload: bytes = field(repr=False)


Event = HandshakeComplete | MessageReceived


class PeerTrust(Protocol):
    """What a responder asks the link layer about a peer that says who it is."""

    def pinned_key(self, site_id: str) -> bytes | None:
        """The pinned ML-DSA-65 public key of a configured peer, None for unknown sites."""

    def bootstrap_allowed(self, site_id: str) -> bool:
        """Whether a signature bootstrap with this peer may happen now."""

    def auth_key(self, site_id: str, key_id: str) -> bytes | None:
        """The authentication key this peer names, if we hold it."""


# The transition table: which frame is acceptable in which state, and what handles it.
# Anything else is a RemoteProtocolError and closes the connection.
_TRANSITIONS: dict[tuple[Role, State, int], str] = {
    (Role.INITIATOR, State.SENT_HELLO, FrameType.RESPONSE): "_on_response",
    (Role.RESPONDER, State.WAIT_HELLO, FrameType.HELLO): "_on_hello",
    (Role.RESPONDER, State.SENT_RESPONSE, FrameType.FINISH): "_on_finish",
    (Role.INITIATOR, State.ESTABLISHED, FrameType.DATA): "_on_data",
    (Role.RESPONDER, State.ESTABLISHED, FrameType.DATA): "_on_data",
    (Role.INITIATOR, State.ESTABLISHED, FrameType.KEY_UPDATE): "_on_key_update",
    (Role.RESPONDER, State.ESTABLISHED, FrameType.KEY_UPDATE): "_on_key_update",
}


@dataclass(frozen=True)
class Hello:
    versions: tuple[int, ...]
    mode: int
    initiator_id: str
    responder_id: str
    psk_id: bytes  # 16 bytes in mode 2, empty in mode 1
    nonce: bytes
    kem_public_key: bytes
    x25519_public: bytes

    def encode(self) -> bytes:
        w = Writer().u8(len(self.versions))
        for version in self.versions:
            w.u8(version)
        w.u8(self.mode).text(self.initiator_id).text(self.responder_id)
        if self.mode == MODE_PSK:
            w.fixed(self.psk_id, PSK_ID_SIZE)
        return (
            w.fixed(self.nonce, NONCE_SIZE)
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
        mode, initiator_id, responder_id = r.u8(), r.text(), r.text()
        if mode not in SUPPORTED_MODES:
            raise RemoteProtocolError(f"unsupported handshake mode {mode}")
        psk_id = r.fixed(PSK_ID_SIZE) if mode == MODE_PSK else b""
        hello = cls(
            versions,
            mode,
            initiator_id,
            responder_id,
            psk_id,
            r.fixed(NONCE_SIZE),
            r.fixed(KEM_PUBLIC_KEY_SIZE),
            r.fixed(X25519_KEY_SIZE),
        )
        r.end()
        return hello


@dataclass(frozen=True)
class HandshakeResponse:
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
    def decode(cls, body: bytes, auth_size: int) -> tuple[HandshakeResponse, bytes, bytes]:
        """Return the response, the authenticated part of the body, and its auth field."""
        r = Reader(body, "RESPONSE")
        response = cls(
            r.u8(),
            r.text(),
            r.fixed(NONCE_SIZE),
            r.fixed(KEM_CIPHERTEXT_SIZE),
            r.fixed(X25519_KEY_SIZE),
        )
        signed = body[: r.consumed]
        auth = r.fixed(auth_size)
        r.end()
        return response, signed, auth


# Per-role signature contexts and MAC keys: what one role produced never verifies as the
# other's, so a reflected message fails.
_SIGNATURE_CONTEXT = {
    Role.RESPONDER: labels.SIG_CONTEXT_RESPONDER,
    Role.INITIATOR: labels.SIG_CONTEXT_INITIATOR,
}
_PSK_MAC_LABEL = {
    Role.RESPONDER: labels.LABEL_PSK_RESPONDER_MAC,
    Role.INITIATOR: labels.LABEL_PSK_INITIATOR_MAC,
}


def _psk_mac_key(psk: bytes, label: bytes) -> bytes:
    return hkdf_expand(hkdf_extract(labels.LABEL_PSK_EXTRACT, psk), label, HASH_SIZE)


class PeerConnection:
    """One end of a peer connection.

    A responder learns who the peer is from HELLO and asks ``trust``. An initiator names
    the site it expects and either an ``auth_key`` (mode 2) or none (mode 1 bootstrap; the
    caller has decided a bootstrap is allowed). ``randomness`` supplies every random value
    of the handshake (the system's unless a recorded transcript is replayed).
    """

    def __init__(
        self,
        role: Role,
        *,
        backend: PqcBackend,
        local_site_id: str,
        signing_key: SigningKey,
        trust: PeerTrust,
        expected_peer: str | None = None,
        auth_key: AuthKey | None = None,
        rekey_after_frames: int = REKEY_AFTER_FRAMES,
        randomness: Randomness = SYSTEM_RANDOMNESS,
    ) -> None:
        if role is Role.INITIATOR and expected_peer is None:
            raise LocalProtocolError("an initiator must name the peer site it expects")
        if role is Role.RESPONDER and auth_key is not None:
            raise LocalProtocolError("a responder learns the authentication key from HELLO")
        self.role = role
        self.state = State.START if role is Role.INITIATOR else State.WAIT_HELLO
        self.peer_site_id = expected_peer
        self.session_id: bytes | None = None
        self.mode = MODE_PSK if auth_key is not None else MODE_SIGNATURE_BOOTSTRAP
        self._auth_key = auth_key
        self._backend = backend
        self._local_id = local_site_id
        self._signing_key = signing_key
        self._trust = trust
        self._frames = FrameBuffer()
        self._outgoing = bytearray()
        self._transcript = hashlib.sha256(labels.PROTOCOL_NAME)
        self._kem_key: KemPrivateKey | None = None
        self._x25519: X25519KeyPair | None = None
        self._shared: bytes | None = None
        self._send: _Direction | None = None
        self._recv: _Direction | None = None
        self._rekey_after_frames = rekey_after_frames
        self._random = randomness

    def __repr__(self) -> str:
        return (
            f"<PeerConnection {self.role.value} {self._local_id}->{self.peer_site_id} "
            f"mode {self.mode} {self.state.value}>"
        )

    # -- public API -----------------------------------------------------------------------

    def initiate(self) -> None:
        if self.role is not Role.INITIATOR or self.state is not State.START:
            raise LocalProtocolError(f"cannot initiate in state {self.state.value}")
        assert self.peer_site_id is not None
        self._kem_key = self._random.kem_key(self._backend)
        self._x25519 = self._random.x25519_key()
        psk_id = uuid.UUID(self._auth_key.key_id).bytes if self._auth_key else b""
        hello = Hello(
            SUPPORTED_VERSIONS,
            self.mode,
            self._local_id,
            self.peer_site_id,
            psk_id,
            self._random.nonce(NONCE_SIZE),
            self._kem_key.public_bytes,
            self._x25519.public_bytes,
        )
        self._emit(make_frame(FrameType.HELLO, hello.encode()))
        self.state = State.SENT_HELLO

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
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
            self._outgoing.clear()  # nothing of ours goes out after a failure
            if isinstance(exc, RemoteProtocolError):
                raise
            raise PeerAuthenticationError(str(exc)) from None
        return events

    def send_message(self, payload: bytes) -> None:
        if self.state is not State.ESTABLISHED or self._send is None:
            raise LocalProtocolError(f"cannot send in state {self.state.value}")
        if len(payload) + AEAD_TAG_SIZE > MAX_SESSION_BODY:
            raise LocalProtocolError("message exceeds the session frame cap")
        if self._send.counter >= self._rekey_after_frames:
            self.update_send_key()
        self._outgoing += self._send.seal(FrameType.DATA, payload)

    def update_send_key(self) -> None:
        """Switch our sending direction to a new key (the I/O layer calls this on a timer;
        ``send_message`` does it by volume). KEY_UPDATE goes under the old key, so the peer
        switches at exactly the same frame; counters restart at 0 with the new key."""
        if self.state is not State.ESTABLISHED or self._send is None:
            raise LocalProtocolError(f"cannot update keys in state {self.state.value}")
        self._outgoing += self._send.seal(FrameType.KEY_UPDATE, b"")
        self._send.ratchet()

    @property
    def awaiting_hello(self) -> bool:
        """A responder that has not yet accepted a HELLO (the I/O layer gives such a
        connection less time and may drop it for a newcomer: docs/protocol.md §3.1)."""
        return self.state is State.WAIT_HELLO

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    # -- handshake ------------------------------------------------------------------------

    def _emit(self, frame: Frame) -> None:
        self._transcript.update(frame.encode())
        self._outgoing += frame.encode()

    def _psk_mac(self, digest: bytes, role: Role) -> bytes:
        assert self._auth_key is not None
        return mac(_psk_mac_key(self._auth_key.material, _PSK_MAC_LABEL[role]), digest)

    def _authenticate(self, digest: bytes, role: Role) -> bytes:
        """Our auth field over ``digest``: a signature (mode 1) or a PSK MAC (mode 2)."""
        if self.mode == MODE_PSK:
            return self._psk_mac(digest, role)
        return self._signing_key.sign(digest, _SIGNATURE_CONTEXT[role])

    def _check_peer_auth(self, digest: bytes, auth: bytes, role: Role) -> None:
        """Raise PeerAuthenticationError unless ``auth`` is the peer's over ``digest``."""
        assert self.peer_site_id is not None
        if self.mode == MODE_PSK:
            assert self._auth_key is not None
            if not constant_time_equal(auth, self._psk_mac(digest, role)):
                raise PeerAuthenticationError(
                    f"site {self.peer_site_id!r} failed authentication: its MAC under "
                    f"authentication key {self._auth_key.key_id} does not verify"
                )
            return
        pinned = self._trust.pinned_key(self.peer_site_id)
        if pinned is None:
            raise PeerAuthenticationError(f"no pinned key for site {self.peer_site_id!r}")
        try:
            self._backend.verify(pinned, digest, auth, _SIGNATURE_CONTEXT[role])
        except AuthenticationFailed:
            raise PeerAuthenticationError(
                f"site {self.peer_site_id!r} failed authentication: its ML-DSA-65 signature "
                "does not verify under the pinned public key"
            ) from None

    def _on_hello(self, frame: Frame) -> None:
        hello = Hello.decode(frame.body)
        if PROTOCOL_VERSION not in hello.versions:
            raise VersionMismatch(version_mismatch("/".join(map(str, hello.versions))))
        if hello.responder_id != self._local_id:
            raise PeerAuthenticationError(
                f"peer {hello.initiator_id!r} wants site {hello.responder_id!r}, "
                f"we are {self._local_id!r}"
            )
        # Unknown sites are refused before any signature or KEM work is done for them.
        if self._trust.pinned_key(hello.initiator_id) is None:
            raise PeerAuthenticationError(f"site {hello.initiator_id!r} is not a configured peer")
        self.peer_site_id = hello.initiator_id
        self.mode = hello.mode
        if hello.mode == MODE_PSK:
            key_id = str(uuid.UUID(bytes=hello.psk_id))
            material = self._trust.auth_key(hello.initiator_id, key_id)
            if material is None:
                raise PeerAuthenticationError(
                    f"site {hello.initiator_id!r} named authentication key {key_id}, which we "
                    "do not hold: the PSK chains are out of step (see `qkdd allow-bootstrap`)"
                )
            self._auth_key = AuthKey(key_id, material)
        elif not self._trust.bootstrap_allowed(hello.initiator_id):
            raise PeerAuthenticationError(
                f"site {hello.initiator_id!r} asked for a signature bootstrap, but we share a "
                "PSK chain with it; if its state was really lost, run `qkdd allow-bootstrap` "
                "on both sites"
            )
        self._transcript.update(frame.encode())

        kem_secret, ciphertext = self._random.kem_encapsulate(self._backend, hello.kem_public_key)
        x25519 = self._random.x25519_key()
        x_secret = x25519.exchange(hello.x25519_public)
        response = HandshakeResponse(
            PROTOCOL_VERSION,
            self._local_id,
            self._random.nonce(NONCE_SIZE),
            ciphertext,
            x25519.public_bytes,
        )
        unsigned = response.encode_unsigned()
        header = _header(FrameType.RESPONSE, len(unsigned) + _AUTH_SIZE[self.mode])
        signed_hash = self._transcript.copy()
        signed_hash.update(header + unsigned)
        auth = self._authenticate(signed_hash.digest(), Role.RESPONDER)
        self._emit(Frame(FrameType.RESPONSE, header, unsigned + auth))
        self._shared = kem_secret + x_secret
        self.state = State.SENT_RESPONSE

    def _on_response(self, frame: Frame) -> Event:
        response, signed, auth = HandshakeResponse.decode(frame.body, _AUTH_SIZE[self.mode])
        if response.version not in SUPPORTED_VERSIONS:
            raise RemoteProtocolError(f"peer chose version {response.version} we did not offer")
        if response.responder_id != self.peer_site_id:
            raise PeerAuthenticationError(
                f"expected site {self.peer_site_id!r}, peer says it is {response.responder_id!r}"
            )
        signed_hash = self._transcript.copy()
        signed_hash.update(frame.header + signed)
        self._check_peer_auth(signed_hash.digest(), auth, Role.RESPONDER)
        self._transcript.update(frame.encode())
        assert self._kem_key is not None and self._x25519 is not None
        kem_secret = self._kem_key.decapsulate(response.kem_ciphertext)
        x_secret = self._x25519.exchange(response.x25519_public)
        self._shared = kem_secret + x_secret

        transcript = self._transcript.digest()
        auth_i = self._authenticate(transcript, Role.INITIATOR)
        confirm = mac(self._key(labels.LABEL_INITIATOR_CONFIRM, transcript), transcript)
        self._emit(make_frame(FrameType.FINISH, auth_i + confirm))
        return self._establish(transcript)

    def _on_finish(self, frame: Frame) -> Event:
        r = Reader(frame.body, "FINISH")
        auth, confirm = r.fixed(_AUTH_SIZE[self.mode]), r.fixed(HASH_SIZE)
        r.end()
        transcript = self._transcript.digest()
        self._check_peer_auth(transcript, auth, Role.INITIATOR)
        expected = mac(self._key(labels.LABEL_INITIATOR_CONFIRM, transcript), transcript)
        if not constant_time_equal(confirm, expected):
            raise PeerAuthenticationError("key confirmation failed")
        self._transcript.update(frame.encode())
        return self._establish(transcript)

    def _key(self, label: bytes, transcript: bytes) -> bytes:
        assert self._shared is not None
        psk = self._auth_key.material if self._auth_key is not None else b""
        secret = hkdf_extract(transcript, labels.LABEL_HANDSHAKE_SECRET + self._shared + psk)
        return hkdf_expand(secret, label, 32)

    def _establish(self, transcript: bytes) -> HandshakeComplete:
        i2r = _Direction(self._key(labels.LABEL_SESSION_INITIATOR_TO_RESPONDER, transcript))
        r2i = _Direction(self._key(labels.LABEL_SESSION_RESPONDER_TO_INITIATOR, transcript))
        self._send, self._recv = (i2r, r2i) if self.role is Role.INITIATOR else (r2i, i2r)
        auth_key_id = self._auth_key.key_id if self._auth_key is not None else None
        # Only the directional keys outlive the handshake.
        self._shared = None
        self._kem_key = None
        self._x25519 = None
        self._auth_key = None
        self.session_id = hashlib.sha256(labels.LABEL_SESSION_ID + transcript).digest()
        self.state = State.ESTABLISHED
        self._frames.max_body = MAX_SESSION_BODY
        assert self.peer_site_id is not None
        return HandshakeComplete(self.peer_site_id, self.session_id, self.mode, auth_key_id)

    # -- session --------------------------------------------------------------------------

    def _on_data(self, frame: Frame) -> Event:
        assert self._recv is not None
        return MessageReceived(self._recv.open(frame))

    def _on_key_update(self, frame: Frame) -> None:
        assert self._recv is not None
        if self._recv.open(frame):
            raise RemoteProtocolError("KEY_UPDATE carries no payload")
        self._recv.ratchet()


class _Direction:
    """One direction of a session: its key, and the frame counter used as AEAD nonce."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._aead = Aead(secret)
        self.counter = 0

    def __repr__(self) -> str:
        return f"<_Direction frame {self.counter} (key hidden)>"

    def _nonce(self) -> bytes:
        return bytes(4) + self.counter.to_bytes(8, "big")

    def seal(self, frame_type: int, payload: bytes) -> bytes:
        header = _header(frame_type, len(payload) + AEAD_TAG_SIZE)
        sealed = self._aead.seal(self._nonce(), payload, header)
        self.counter += 1
        return header + sealed

    def open(self, frame: Frame) -> bytes:
        try:
            payload = self._aead.open(self._nonce(), frame.body, frame.header)
        except AuthenticationFailed:
            raise PeerAuthenticationError(
                "session frame failed authentication (tampered, replayed, reordered or injected)"
            ) from None
        self.counter += 1
        return payload

    def ratchet(self) -> None:
        """Move to the next key; the old one is forgotten, so past frames stay secret."""
        self._secret = hkdf_expand(self._secret, labels.LABEL_KEY_UPDATE, 32)
        self._aead = Aead(self._secret)
        self.counter = 0


def _header(frame_type: int, length: int) -> bytes:
    return FRAME_HEADER.pack(PROTOCOL_VERSION, frame_type, length)
