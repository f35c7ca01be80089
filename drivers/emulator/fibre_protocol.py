"""The fibre protocol: what the two halves of an emulated QKD link (``qkd-emulator half``)
say to each other, wire format and state machine, sans-IO (no sockets, no clock, no Trio).

One TCP connection between the halves carries two things a real QKD link keeps apart:

* the quantum channel. Alice's half simulates each block (``physics.simulate_block`` needs
  both ends' raw strings) and sends Bob's detection record (his bit and basis for every
  click) in a RECORD frame. On a real link this is where photons would travel down the
  fibre and Bob's detectors would write the record; nothing else about the emulation
  lets one half see the other's raw key.
* the classical post-processing channel. Bob drives ``postprocessing`` exactly as with
  ``InMemoryChannel``: each REQUEST carries one post-processing message, each REPLY
  Alice's answer. A real link authenticates this channel; here it is plain TCP.

Frame: ``length u32 | type u8 | body`` (big-endian), ``length`` counting the body only, at
most ``MAX_BODY_SIZE``. Frames, by type (``seq`` is the block number, u64, counted from 1
by each Alice process):

=========  ======  ========================================================================
type       sender  body
=========  ======  ========================================================================
HELLO      both    ``"QKDF" | version u8 | role u8 | instance 16 | committed u64 |
                   digest 32 | params length u16 | params (JSON)``; Bob first, Alice after
NEXT       Bob     empty: Bob has room for another block
RECORD     Alice   ``seq | pulses u64 | decoy u8 (0/1) | [10 x u64 decoy counts] |
                   clicks u32 | Bob's bits (packed) | Bob's bases (packed)``
REQUEST    Bob     ``seq | post-processing message``
REPLY      Alice   ``seq | Alice's reply``
COMMIT     Bob     ``seq | keys u32 | SHA-256 of the key IDs``: Bob holds these keys
COMMITTED  Alice   ``seq``: Alice has handed the block's keys to her host
PING       both    empty (keep-alive)
ERROR      both    ``code u8 | reason (UTF-8)``; the sender closes after it
=========  ======  ========================================================================

Key delivery stays in lockstep. Alice draws the key IDs (random UUIDs, in her AMPLIFY
reply, as in one process). Bob answers a block that produced keys with COMMIT; Alice
checks the key count and the ID digest against her own keys, hands them to her pty and
only then answers COMMITTED, upon which Bob hands over his. If the connection breaks in
between, Bob keeps the block and Alice's next HELLO says which block she committed last
(``committed``, with ``instance`` naming her process): Bob hands the kept block over if
it is that one, and drops it otherwise. Any block interrupted earlier is dropped at both
ends: neither side has handed over a key from it.

Key material never crosses this link: equality of the two ends' keys rests on the
post-processing's 64-bit verification hash, as on a real link. HELLO carries each half's
link parameters (JSON keyed by flag name) and their SHA-256; halves whose digests differ
refuse each other (``ParameterMismatchError``), naming the flags that differ.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..device_errors import DeviceError
from .physics import DecoyStats, PartyRecord, pack_to_bytes, unpack_from_bytes

__all__ = [
    "FIBRE_PROTOCOL_VERSION",
    "MAX_BODY_SIZE",
    "MAX_RECORD_CLICKS",
    "Commit",
    "Committed",
    "FibreErrorCode",
    "FibreError",
    "FibreProtocol",
    "FrameFormatError",
    "FrameReader",
    "FibreFrameType",
    "FibreHello",
    "FibreFault",
    "Next",
    "ParameterMismatchError",
    "PeerRefusedError",
    "Ping",
    "Record",
    "Reply",
    "Request",
    "HalfRole",
    "FibreState",
    "UnexpectedFrameError",
    "decode_body",
    "encode_frame",
    "key_ids_digest",
    "params_digest",
]

#: Version of this wire format, carried in HELLO; halves of different versions refuse.
#: 2: decoy-state finite-key post-processing (its Cascade and verification messages).
FIBRE_PROTOCOL_VERSION = 2
HELLO_MAGIC = b"QKDF"
_HEADER = struct.Struct(">IB")
HEADER_SIZE = _HEADER.size
#: A RECORD is two bits per click; 16 MiB leaves room for blocks of over 60 million
#: clicks (the default is 600 000) and bounds what a stray peer can make us buffer.
MAX_BODY_SIZE = 16 * 1024 * 1024
#: Largest block the record format is used for; ``--block-detections`` is checked
#: against it with room for the binomial spread of the click count.
MAX_RECORD_CLICKS = 60_000_000
INSTANCE_SIZE = 16
DIGEST_SIZE = 32
#: The parameters are a dozen numbers; 4 KiB is far more than they need.
MAX_PARAMS_SIZE = 4096
#: Reasons are for operators' logs.
MAX_REASON_SIZE = 1000

_U64 = struct.Struct(">Q")
_HELLO_FIXED = struct.Struct(">4sBB16sQ32sH")
_RECORD_FIXED = struct.Struct(">QQB")
_DECOY = struct.Struct(">10Q")
_CLICKS = struct.Struct(">I")
_COMMIT = struct.Struct(">QI32s")


class FibreError(DeviceError):
    """Base class of the faults of the connection between the two emulator halves."""


class FibreFault(FibreError):
    """The connection must be closed and the current block dropped; reconnecting may help."""


class FrameFormatError(FibreFault):
    """Bytes from the peer are not a frame of this format (or not from a qkd-emulator half)."""


class UnexpectedFrameError(FibreFault):
    """A well-formed frame arrived out of order, or for another block."""


class ParameterMismatchError(FibreError):
    """The two halves are configured differently: an operator must fix one of them."""


class PeerRefusedError(FibreError):
    """The peer sent ERROR; ``fatal`` if it refuses the configuration (do not retry)."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


class HalfRole(enum.IntEnum):
    ALICE = 1  # simulates the blocks, answers the post-processing
    BOB = 2  # asks for blocks, drives the post-processing


class FibreFrameType(enum.IntEnum):
    HELLO = 1
    NEXT = 2
    RECORD = 3
    REQUEST = 4
    REPLY = 5
    COMMIT = 6
    COMMITTED = 7
    PING = 8
    ERROR = 9


class FibreErrorCode(enum.IntEnum):
    PROTOCOL = 1  # a fault of this connection: the sender drops the block and reconnects
    CONFIGURATION = 2  # the halves must not talk: the sender stops


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FibreHello:
    role: HalfRole
    instance: bytes  # random per process, so a restarted Alice is told apart
    committed: int  # Alice: last block handed to her host (0: none); Bob: 0
    params: bytes  # canonical JSON of the link parameters
    version: int = FIBRE_PROTOCOL_VERSION

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.params).digest()


@dataclass(frozen=True)
class Next:
    pass


@dataclass(frozen=True)
class Record:
    seq: int
    pulses: int
    decoy: DecoyStats | None
    bob: PartyRecord  # its repr shows the click count only


@dataclass(frozen=True)
class Request:
    seq: int
    message: bytes = field(repr=False)


@dataclass(frozen=True)
class Reply:
    seq: int
    message: bytes = field(repr=False)


@dataclass(frozen=True)
class Commit:
    seq: int
    keys: int
    ids_digest: bytes


@dataclass(frozen=True)
class Committed:
    seq: int


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class FibreErrorMessage:
    code: FibreErrorCode
    reason: str


Message = (
    FibreHello | Next | Record | Request | Reply | Commit | Committed | Ping | FibreErrorMessage
)

_TYPE_OF: dict[type, FibreFrameType] = {
    FibreHello: FibreFrameType.HELLO,
    Next: FibreFrameType.NEXT,
    Record: FibreFrameType.RECORD,
    Request: FibreFrameType.REQUEST,
    Reply: FibreFrameType.REPLY,
    Commit: FibreFrameType.COMMIT,
    Committed: FibreFrameType.COMMITTED,
    Ping: FibreFrameType.PING,
    FibreErrorMessage: FibreFrameType.ERROR,
}


def params_digest(params: bytes) -> bytes:
    return hashlib.sha256(params).digest()


def key_ids_digest(keys: list[tuple[bytes, bytes]]) -> bytes:
    """SHA-256 over the key IDs in order (IDs are public; the material is not hashed)."""
    return hashlib.sha256(b"".join(key_id for key_id, _ in keys)).digest()


# -- encoding -----------------------------------------------------------------------------


def _encode_body(msg: Message) -> bytes:
    if isinstance(msg, FibreHello):
        if len(msg.instance) != INSTANCE_SIZE or len(msg.params) > MAX_PARAMS_SIZE:
            raise ValueError("HELLO instance must be 16 bytes and params at most 4 KiB")
        return (
            _HELLO_FIXED.pack(
                HELLO_MAGIC,
                msg.version,
                msg.role,
                msg.instance,
                msg.committed,
                msg.digest,
                len(msg.params),
            )
            + msg.params
        )
    if isinstance(msg, Next | Ping):
        return b""
    if isinstance(msg, Record):
        out = [_RECORD_FIXED.pack(msg.seq, msg.pulses, msg.decoy is not None)]
        if msg.decoy is not None:
            d = msg.decoy
            out.append(_DECOY.pack(*d.pulses, *d.clicks, *d.sifted, *d.errors))
        clicks = len(msg.bob.bits)
        if len(msg.bob.bases) != clicks:
            raise ValueError("a record needs one basis per click")
        out += [_CLICKS.pack(clicks), pack_to_bytes(msg.bob.bits), pack_to_bytes(msg.bob.bases)]
        return b"".join(out)
    if isinstance(msg, Request | Reply):
        return _U64.pack(msg.seq) + msg.message
    if isinstance(msg, Commit):
        return _COMMIT.pack(msg.seq, msg.keys, msg.ids_digest)
    if isinstance(msg, Committed):
        return _U64.pack(msg.seq)
    if isinstance(msg, FibreErrorMessage):
        return bytes([msg.code]) + msg.reason.encode("utf-8")[:MAX_REASON_SIZE]
    raise TypeError(f"not a fibre link message: {msg!r}")


def encode_frame(msg: Message) -> bytes:
    """One whole frame (header and body) for ``msg``."""
    body = _encode_body(msg)
    if len(body) > MAX_BODY_SIZE:
        raise ValueError(f"frame body of {len(body)} bytes exceeds {MAX_BODY_SIZE}")
    return _HEADER.pack(len(body), _TYPE_OF[type(msg)]) + body


# -- decoding -----------------------------------------------------------------------------


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise FrameFormatError(f"{what} has {len(body)} bytes, expected {size}")


def _decode_hello(body: bytes) -> FibreHello:
    if len(body) < _HELLO_FIXED.size or not body.startswith(HELLO_MAGIC):
        raise FrameFormatError(
            "the peer is not a qkd-emulator half (bad HELLO); check --connect/--listen"
        )
    magic, version, role, instance, committed, digest, size = _HELLO_FIXED.unpack_from(body)
    if version != FIBRE_PROTOCOL_VERSION:
        # Checked before the rest: a future version may lay the rest out differently.
        raise ParameterMismatchError(
            f"the peer half speaks fibre link version {version}, this half version "
            f"{FIBRE_PROTOCOL_VERSION}: run the same qkd-emulator release on both hosts"
        )
    params = body[_HELLO_FIXED.size :]
    if len(params) != size or size > MAX_PARAMS_SIZE:
        raise FrameFormatError("HELLO parameters have the wrong size")
    if not hmac.compare_digest(digest, params_digest(params)):
        raise FrameFormatError("HELLO parameter digest does not match the parameters")
    try:
        peer_role = HalfRole(role)
    except ValueError:
        raise FrameFormatError(f"HELLO names an unknown role {role}") from None
    return FibreHello(peer_role, instance, committed, params, version)


def _decode_record(body: bytes) -> Record:
    if len(body) < _RECORD_FIXED.size:
        raise FrameFormatError("RECORD truncated")
    seq, pulses, has_decoy = _RECORD_FIXED.unpack_from(body)
    off = _RECORD_FIXED.size
    decoy = None
    if has_decoy not in (0, 1):
        raise FrameFormatError("RECORD decoy flag must be 0 or 1")
    if has_decoy:
        if len(body) < off + _DECOY.size:
            raise FrameFormatError("RECORD truncated in the decoy counts")
        v = _DECOY.unpack_from(body, off)
        decoy = DecoyStats(v[0:3], v[3:6], v[6:8], v[8:10])
        off += _DECOY.size
    if len(body) < off + _CLICKS.size:
        raise FrameFormatError("RECORD truncated before the click count")
    (clicks,) = _CLICKS.unpack_from(body, off)
    off += _CLICKS.size
    packed = (clicks + 7) // 8
    if clicks > MAX_RECORD_CLICKS:
        raise FrameFormatError(f"RECORD of {clicks} clicks exceeds {MAX_RECORD_CLICKS}")
    _need(body[off:], 2 * packed, "RECORD bits and bases")
    try:
        bits = unpack_from_bytes(body[off : off + packed], clicks)
        bases = unpack_from_bytes(body[off + packed :], clicks)
    except ValueError as exc:
        raise FrameFormatError(f"RECORD: {exc}") from None
    return Record(seq, pulses, decoy, PartyRecord(bits, bases))


def decode_body(frame_type: FibreFrameType, body: bytes) -> Message:
    """The message in one frame body; raises ``FrameFormatError`` if it is malformed."""
    if frame_type is FibreFrameType.HELLO:
        return _decode_hello(body)
    if frame_type is FibreFrameType.RECORD:
        return _decode_record(body)
    if frame_type in (FibreFrameType.NEXT, FibreFrameType.PING):
        _need(body, 0, frame_type.name)
        return Next() if frame_type is FibreFrameType.NEXT else Ping()
    if frame_type in (FibreFrameType.REQUEST, FibreFrameType.REPLY):
        if len(body) < _U64.size:
            raise FrameFormatError(f"{frame_type.name} truncated")
        (seq,) = _U64.unpack_from(body)
        cls = Request if frame_type is FibreFrameType.REQUEST else Reply
        return cls(seq, body[_U64.size :])
    if frame_type is FibreFrameType.COMMIT:
        _need(body, _COMMIT.size, "COMMIT")
        return Commit(*_COMMIT.unpack(body))
    if frame_type is FibreFrameType.COMMITTED:
        _need(body, _U64.size, "COMMITTED")
        return Committed(_U64.unpack(body)[0])
    if frame_type is FibreFrameType.ERROR:
        if not body or len(body) > 1 + MAX_REASON_SIZE:
            raise FrameFormatError("malformed ERROR frame")
        try:
            code = FibreErrorCode(body[0])
        except ValueError:
            raise FrameFormatError(f"ERROR frame with unknown code {body[0]}") from None
        return FibreErrorMessage(code, body[1:].decode("utf-8", "replace"))
    raise FrameFormatError(f"unknown frame type {frame_type}")


class FrameReader:
    """Bytes in, frames out. The header is checked (size cap, known type) before any body
    byte is buffered, so garbage is refused after at most five bytes."""

    def __init__(self, max_body: int = MAX_BODY_SIZE) -> None:
        self._buf = bytearray()
        self._max_body = max_body

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[FibreFrameType, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER_SIZE:
            length, kind = _HEADER.unpack_from(self._buf)
            if length > self._max_body:
                raise FrameFormatError(
                    f"frame of {length} bytes exceeds the {self._max_body}-byte limit "
                    "(not a qkd-emulator half, or a corrupted stream)"
                )
            try:
                frame_type = FibreFrameType(kind)
            except ValueError:
                raise FrameFormatError(
                    f"unknown frame type {kind} (not a qkd-emulator half?)"
                ) from None
            if len(self._buf) < HEADER_SIZE + length:
                break
            frames.append((frame_type, bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])))
            del self._buf[: HEADER_SIZE + length]
        return frames


# -- the state machine ----------------------------------------------------------------------


class FibreState(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"  # Bob: waiting for Alice's HELLO
    HELLO_RECEIVED = "hello-received"  # Alice: Bob's HELLO checked, hers not yet sent
    IDLE = "idle"  # between blocks
    AWAIT_RECORD = "await-record"  # Bob sent NEXT / Alice owes a RECORD
    BLOCK = "block"  # post-processing under way
    AWAIT_REPLY = "await-reply"  # a REQUEST is outstanding
    AWAIT_COMMITTED = "await-committed"  # a COMMIT is outstanding
    CLOSED = "closed"


_SEND, _RECV = "send", "recv"
F = FibreFrameType
S = FibreState

#: (state, direction, frame type) -> next state, for each role. PING is allowed in any
#: state after START and changes nothing; ERROR is allowed in any state and closes.
#: Anything else is refused.
TRANSITIONS: dict[HalfRole, dict[tuple[FibreState, str, FibreFrameType], FibreState]] = {
    HalfRole.BOB: {
        (S.START, _SEND, F.HELLO): S.HELLO_SENT,
        (S.HELLO_SENT, _RECV, F.HELLO): S.IDLE,
        (S.IDLE, _SEND, F.NEXT): S.AWAIT_RECORD,
        (S.AWAIT_RECORD, _RECV, F.RECORD): S.BLOCK,
        (S.BLOCK, _SEND, F.REQUEST): S.AWAIT_REPLY,
        (S.AWAIT_REPLY, _RECV, F.REPLY): S.BLOCK,
        (S.BLOCK, _SEND, F.COMMIT): S.AWAIT_COMMITTED,
        (S.BLOCK, _SEND, F.NEXT): S.AWAIT_RECORD,  # the block gave no key
        (S.AWAIT_COMMITTED, _RECV, F.COMMITTED): S.IDLE,
    },
    HalfRole.ALICE: {
        (S.START, _RECV, F.HELLO): S.HELLO_RECEIVED,
        (S.HELLO_RECEIVED, _SEND, F.HELLO): S.IDLE,
        (S.IDLE, _RECV, F.NEXT): S.AWAIT_RECORD,
        (S.AWAIT_RECORD, _SEND, F.RECORD): S.BLOCK,
        (S.BLOCK, _RECV, F.REQUEST): S.AWAIT_REPLY,
        (S.AWAIT_REPLY, _SEND, F.REPLY): S.BLOCK,
        (S.BLOCK, _RECV, F.COMMIT): S.AWAIT_COMMITTED,
        (S.BLOCK, _RECV, F.NEXT): S.AWAIT_RECORD,
        (S.AWAIT_COMMITTED, _SEND, F.COMMITTED): S.IDLE,
    },
}
del F, S


def canonical_params(params: Mapping[str, object]) -> bytes:
    """The bytes both halves compare: JSON with sorted keys and no spaces."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":")).encode()


def describe_mismatch(mine: bytes, theirs: bytes) -> str:
    """Which flags differ, for the operator."""
    try:
        a, b = json.loads(mine), json.loads(theirs)
    except ValueError:
        return "the peer's parameters are unreadable"
    if not isinstance(b, dict):
        return "the peer's parameters are unreadable"
    names = sorted(set(a) | set(b))
    diffs = [
        f"{n} (here {a.get(n, 'unset')}, peer {b.get(n, 'unset')})"
        for n in names
        if a.get(n) != b.get(n)
    ]
    return ", ".join(diffs) or "the parameters differ"


class FibreProtocol:
    """One connection's state machine (h11 style): ``send`` returns bytes to write,
    ``receive_data`` returns the messages in the bytes read. Both raise on anything the
    transition table does not allow, and leave the state unchanged when they do."""

    def __init__(self, role: HalfRole, params: bytes) -> None:
        self.role = role
        self.params = params
        self.state = FibreState.START
        self.seq = 0  # the block under way (Bob: from RECORD; Alice: from RECORD sent)
        self.peer: FibreHello | None = None
        self._reader = FrameReader()
        self._table = TRANSITIONS[role]

    def _step(self, direction: str, kind: FibreFrameType) -> FibreState:
        if kind is FibreFrameType.ERROR:
            return FibreState.CLOSED
        if kind is FibreFrameType.PING and self.state is not FibreState.START:
            return self.state
        new = self._table.get((self.state, direction, kind))
        if new is None:
            verb = "send" if direction == _SEND else "receive"
            raise UnexpectedFrameError(
                f"{self.role.name.lower()} cannot {verb} {kind.name} in state {self.state.value}"
            )
        return new

    def _check_seq(self, msg: Message) -> None:
        seq = getattr(msg, "seq", None)
        if seq is not None and not isinstance(msg, Record) and seq != self.seq:
            raise UnexpectedFrameError(
                f"{type(msg).__name__} for block {seq}, but block {self.seq} is under way"
            )

    def send(self, msg: Message) -> bytes:
        kind = _TYPE_OF[type(msg)]
        new = self._step(_SEND, kind)
        if isinstance(msg, FibreHello) and (msg.role is not self.role or msg.params != self.params):
            raise ValueError("our HELLO must carry our role and parameters")
        if isinstance(msg, Record):
            if msg.seq <= self.seq:
                raise ValueError("block numbers must increase")
            self.seq = msg.seq
        else:
            self._check_seq(msg)
        data = encode_frame(msg)
        self.state = new
        return data

    def receive_data(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        for kind, body in self._reader.feed(data):
            if self.state is FibreState.CLOSED:
                break
            msg = decode_body(kind, body)
            if isinstance(msg, FibreErrorMessage):
                self.state = FibreState.CLOSED
                raise PeerRefusedError(
                    f"the peer half refused: {msg.reason}",
                    fatal=msg.code is FibreErrorCode.CONFIGURATION,
                )
            new = self._step(_RECV, kind)
            if isinstance(msg, FibreHello):
                self._check_hello(msg)
            elif isinstance(msg, Record):
                if msg.seq <= self.seq:
                    raise UnexpectedFrameError(f"RECORD for old block {msg.seq}")
                self.seq = msg.seq
            else:
                self._check_seq(msg)
            self.state = new
            out.append(msg)
        return out

    def _check_hello(self, hello: FibreHello) -> None:
        if hello.role is self.role:
            raise ParameterMismatchError(
                f"both halves run --role {self.role.name.lower()}: one host must run "
                "--role alice and the other --role bob"
            )
        if not hmac.compare_digest(hello.digest, params_digest(self.params)):
            raise ParameterMismatchError(
                "the two halves run different link parameters: "
                f"{describe_mismatch(self.params, hello.params)}; "
                "run both halves with the same link flags"
            )
        self.peer = hello
