"""Serial protocol messages: one frozen dataclass per message and its payload codec.

``encode_message`` gives (type, payload); ``decode_message`` parses a payload and raises
``MessageError`` (a ``ProtocolError``) on anything that is not exactly a valid message.
Every length is checked before the bytes it covers are read. Layouts are in PROTOCOL.md.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..device_errors import MessageError
from .serial_constants import (
    ERROR_FIXED_SIZE,
    HELLO_FIXED_SIZE,
    KEY_ENTRY_HEADER_SIZE,
    KEY_ID_SIZE,
    MAX_ACK_IDS_PER_FRAME,
    MAX_ERROR_DETAIL_SIZE,
    MAX_FRAME_SIZE,
    MAX_KEY_MATERIAL_SIZE,
    MAX_KEYS_PER_FRAME,
    MAX_PAYLOAD_SIZE,
    MAX_PEER_NAME_SIZE,
    MAX_SITE_ID_SIZE,
    MIN_PEER_MAX_FRAME,
    QBER_SCALE,
    STATUS_SIZE,
    UNKNOWN_U16,
    UNKNOWN_U32,
)

__all__ = [
    "Ack",
    "SerialErrorCode",
    "SerialErrorMessage",
    "SerialHello",
    "Identity",
    "KeyEntry",
    "Keys",
    "LinkState",
    "Message",
    "SerialMessageType",
    "SerialRole",
    "Status",
    "decode_message",
    "encode_message",
]


class SerialMessageType(enum.IntEnum):
    HELLO = 0x1
    STATUS = 0x2
    KEYS = 0x3
    ACK = 0x4
    ERROR = 0x5
    IDENTITY = 0x6  # version 2 on


class SerialRole(enum.IntEnum):
    HOST = 0x01
    DEVICE = 0x02


class LinkState(enum.IntEnum):
    """State of the quantum link between the two devices, as the device sees it."""

    DOWN = 0
    UP = 1
    STARTING = 2  # aligning / calibrating: no key yet


class SerialErrorCode(enum.IntEnum):
    """Numbered ERROR codes; the table with meanings and actions is in PROTOCOL.md."""

    UNSUPPORTED_VERSION = 0x0001
    UNEXPECTED_MESSAGE = 0x0002
    MALFORMED_MESSAGE = 0x0003
    KEYS_DISCARDED = 0x0004
    DEVICE_FAULT = 0x0005


@dataclass(frozen=True)
class SerialHello:
    role: SerialRole
    min_version: int
    max_version: int
    selected_version: int  # 0 from a host, and from a device announcing itself unasked
    window: int  # device: keys it keeps in flight; host: the most it wants (0 = any)
    max_frame: int  # largest decoded frame the sender accepts
    name: str = ""  # for logs only


@dataclass(frozen=True)
class Status:
    link_state: LinkState
    qber: float | None  # fraction 0..1
    secret_key_rate: int | None  # bit/s
    keys_buffered: int | None  # keys the device holds for this host, in flight included


class KeyEntry:
    """One key of a KEYS message. A plain slotted class, not a frozen dataclass: a KEYS
    frame decodes into up to 255 of these, and building a frozen dataclass costs about three
    times as much per key at device line rates."""

    __slots__ = ("key_id", "material")

    def __init__(self, key_id: bytes, material: bytes) -> None:
        self.key_id = key_id  # 16-byte UUID
        self.material = material

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyEntry):
            return NotImplemented
        return self.key_id == other.key_id and self.material == other.material

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:  # never the material
        return f"KeyEntry(key_id={self.key_id!r})"


@dataclass(frozen=True)
class Keys:
    keys: tuple[KeyEntry, ...]


@dataclass(frozen=True)
class Ack:
    key_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class Identity:
    """Which end of which QKD link a device is: the site its keys are for, and the site at
    the other end (both empty: the device was not told, and says nothing)."""

    site: str
    peer_site: str

    @property
    def known(self) -> bool:
        return bool(self.site)


@dataclass(frozen=True)
class SerialErrorMessage:
    code: int  # a SerialErrorCode value; unknown codes are kept as numbers
    detail: str = ""


Message = SerialHello | Status | Keys | Ack | SerialErrorMessage | Identity

_HELLO = struct.Struct(">BBBBHHB")
_STATUS = struct.Struct(">BHII")
_U16 = struct.Struct(">H")
_ERROR = struct.Struct(">HB")
assert _HELLO.size == HELLO_FIXED_SIZE and _STATUS.size == STATUS_SIZE
assert _ERROR.size == ERROR_FIXED_SIZE


def keys_entry_size(material_len: int) -> int:
    return KEY_ENTRY_HEADER_SIZE + material_len


# -- encoding --------------------------------------------------------------------------


def encode_message(msg: Message) -> tuple[SerialMessageType, bytes]:
    """Payload of ``msg``; raises ValueError for a message this side must not send."""
    if isinstance(msg, SerialHello):
        name = msg.name.encode("utf-8")
        if len(name) > MAX_PEER_NAME_SIZE:
            raise ValueError("peer name is too long")
        problem = hello_problem(msg)
        if problem:
            raise ValueError(problem)
        fixed = _HELLO.pack(
            msg.role,
            msg.min_version,
            msg.max_version,
            msg.selected_version,
            msg.window,
            msg.max_frame,
            len(name),
        )
        return SerialMessageType.HELLO, fixed + name
    if isinstance(msg, Status):
        if msg.qber is None:
            qber = UNKNOWN_U16
        elif 0.0 <= msg.qber <= 1.0:
            qber = round(msg.qber * QBER_SCALE)
        else:
            raise ValueError("QBER must be between 0 and 1")
        payload = _STATUS.pack(
            msg.link_state,
            qber,
            _u32_or_unknown(msg.secret_key_rate),
            _u32_or_unknown(msg.keys_buffered),
        )
        return SerialMessageType.STATUS, payload
    if isinstance(msg, Keys):
        if not 1 <= len(msg.keys) <= MAX_KEYS_PER_FRAME:
            raise ValueError("a KEYS message carries 1 to 255 keys")
        parts = [bytes([len(msg.keys)])]
        for entry in msg.keys:
            if len(entry.key_id) != KEY_ID_SIZE:
                raise ValueError("key ID must be 16 bytes")
            if not 1 <= len(entry.material) <= MAX_KEY_MATERIAL_SIZE:
                raise ValueError("key material must be 1 to 1024 bytes")
            parts += (entry.key_id, _U16.pack(len(entry.material)), entry.material)
        payload = b"".join(parts)
        if len(payload) > MAX_PAYLOAD_SIZE:
            raise ValueError("keys do not fit in one frame")
        return SerialMessageType.KEYS, payload
    if isinstance(msg, Ack):
        if not 1 <= len(msg.key_ids) <= MAX_ACK_IDS_PER_FRAME:
            raise ValueError("an ACK message carries 1 to 255 key IDs")
        if any(len(k) != KEY_ID_SIZE for k in msg.key_ids):
            raise ValueError("key ID must be 16 bytes")
        return SerialMessageType.ACK, bytes([len(msg.key_ids)]) + b"".join(msg.key_ids)
    if isinstance(msg, Identity):
        site, peer = msg.site.encode("utf-8"), msg.peer_site.encode("utf-8")
        if len(site) > MAX_SITE_ID_SIZE or len(peer) > MAX_SITE_ID_SIZE:
            raise ValueError("a site ID is at most 64 bytes")
        if bool(site) != bool(peer):
            raise ValueError("an identity names both sites or neither")
        return SerialMessageType.IDENTITY, bytes([len(site)]) + site + bytes([len(peer)]) + peer
    if isinstance(msg, SerialErrorMessage):
        detail = msg.detail.encode("utf-8")[:MAX_ERROR_DETAIL_SIZE]
        # Cutting may split a UTF-8 sequence; drop the broken tail.
        detail = detail.decode("utf-8", "ignore").encode("utf-8")
        return SerialMessageType.ERROR, _ERROR.pack(msg.code, len(detail)) + detail
    raise TypeError(f"not a protocol message: {type(msg).__name__}")


def _u32_or_unknown(value: int | None) -> int:
    if value is None:
        return UNKNOWN_U32
    if not 0 <= value < UNKNOWN_U32:
        raise ValueError("value does not fit in a u32")
    return int(value)


def hello_problem(msg: SerialHello) -> str | None:
    """What makes ``msg`` an invalid HELLO, or None."""
    if msg.role not in (SerialRole.HOST, SerialRole.DEVICE):
        return f"HELLO role {msg.role} is neither host nor device"
    if not 1 <= msg.min_version <= msg.max_version <= 15:
        return "HELLO version range is empty or outside 1..15"
    if msg.selected_version and not msg.min_version <= msg.selected_version <= msg.max_version:
        return "HELLO selected version is outside the sender's own range"
    if msg.role == SerialRole.HOST and msg.selected_version:
        return "a host HELLO must not select a version"
    if msg.role == SerialRole.DEVICE and msg.window == 0:
        return "a device HELLO must announce a window of at least 1 key"
    if not MIN_PEER_MAX_FRAME <= msg.max_frame <= MAX_FRAME_SIZE:
        return f"HELLO max_frame {msg.max_frame} is outside 1280..4096"
    return None


# -- decoding --------------------------------------------------------------------------


def decode_message(msg_type: int, payload: bytes) -> Message:
    """Parse a payload of the given type; raises MessageError."""
    decoder = _DECODERS.get(msg_type)
    if decoder is None:
        raise MessageError(f"unknown message type 0x{msg_type:x}")
    return decoder(payload)


def _decode_hello(p: bytes) -> SerialHello:
    if len(p) < HELLO_FIXED_SIZE:
        raise MessageError("HELLO is shorter than its fixed part")
    role, vmin, vmax, selected, window, max_frame, name_len = _HELLO.unpack_from(p)
    if name_len > MAX_PEER_NAME_SIZE or len(p) != HELLO_FIXED_SIZE + name_len:
        raise MessageError("HELLO name length does not match the payload")
    if role not in (SerialRole.HOST, SerialRole.DEVICE):
        raise MessageError(f"HELLO role {role} is neither host nor device")
    try:
        name = p[HELLO_FIXED_SIZE:].decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("HELLO name is not UTF-8") from None
    msg = SerialHello(SerialRole(role), vmin, vmax, selected, window, max_frame, name)
    problem = hello_problem(msg)
    if problem:
        raise MessageError(problem)
    return msg


def _decode_status(p: bytes) -> Status:
    if len(p) != STATUS_SIZE:
        raise MessageError(f"STATUS must be {STATUS_SIZE} bytes, got {len(p)}")
    state, qber, rate, buffered = _STATUS.unpack(p)
    try:
        link_state = LinkState(state)
    except ValueError:
        raise MessageError(f"STATUS link state {state} is unknown") from None
    if qber != UNKNOWN_U16 and qber > QBER_SCALE:
        raise MessageError("STATUS QBER is above 100 %")
    return Status(
        link_state,
        None if qber == UNKNOWN_U16 else qber / QBER_SCALE,
        None if rate == UNKNOWN_U32 else rate,
        None if buffered == UNKNOWN_U32 else buffered,
    )


def _decode_keys(p: bytes) -> Keys:
    if not p:
        raise MessageError("KEYS is empty")
    count = p[0]
    if count == 0:
        raise MessageError("KEYS carries no key")
    entries = []
    seen = set()
    pos = 1
    n = len(p)
    for _ in range(count):
        if pos + KEY_ENTRY_HEADER_SIZE > n:
            raise MessageError("KEYS entry header runs past the payload")
        key_id = p[pos : pos + KEY_ID_SIZE]
        (length,) = _U16.unpack_from(p, pos + KEY_ID_SIZE)
        pos += KEY_ENTRY_HEADER_SIZE
        if not 1 <= length <= MAX_KEY_MATERIAL_SIZE:
            raise MessageError(f"KEYS material length {length} is outside 1..1024")
        if pos + length > n:
            raise MessageError("KEYS material runs past the payload")
        if key_id in seen:
            raise MessageError("KEYS repeats a key ID within one frame")
        seen.add(key_id)
        entries.append(KeyEntry(key_id, p[pos : pos + length]))
        pos += length
    if pos != n:
        raise MessageError("KEYS has bytes after its last key")
    return Keys(tuple(entries))


def _decode_ack(p: bytes) -> Ack:
    if not p or p[0] == 0:
        raise MessageError("ACK carries no key ID")
    count = p[0]
    if len(p) != 1 + count * KEY_ID_SIZE:
        raise MessageError("ACK length does not match its count")
    return Ack(tuple(p[1 + i * KEY_ID_SIZE : 1 + (i + 1) * KEY_ID_SIZE] for i in range(count)))


def _decode_error(p: bytes) -> SerialErrorMessage:
    if len(p) < ERROR_FIXED_SIZE:
        raise MessageError("ERROR is shorter than its fixed part")
    code, detail_len = _ERROR.unpack_from(p)
    if detail_len > MAX_ERROR_DETAIL_SIZE or len(p) != ERROR_FIXED_SIZE + detail_len:
        raise MessageError("ERROR detail length does not match the payload")
    try:
        detail = p[ERROR_FIXED_SIZE:].decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("ERROR detail is not UTF-8") from None
    return SerialErrorMessage(code, detail)


def _decode_identity(p: bytes) -> Identity:
    texts = []
    pos = 0
    for _ in range(2):
        if pos >= len(p):
            raise MessageError("IDENTITY is shorter than its two lengths")
        length = p[pos]
        if length > MAX_SITE_ID_SIZE or pos + 1 + length > len(p):
            raise MessageError("IDENTITY site ID length does not match the payload")
        try:
            texts.append(p[pos + 1 : pos + 1 + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise MessageError("IDENTITY site ID is not UTF-8") from None
        pos += 1 + length
    if pos != len(p):
        raise MessageError("IDENTITY has bytes after its second site ID")
    if bool(texts[0]) != bool(texts[1]):
        raise MessageError("IDENTITY names one site but not the other")
    return Identity(texts[0], texts[1])


_DECODERS: dict[int, Callable[[bytes], Message]] = {
    SerialMessageType.HELLO: _decode_hello,
    SerialMessageType.STATUS: _decode_status,
    SerialMessageType.KEYS: _decode_keys,
    SerialMessageType.ACK: _decode_ack,
    SerialMessageType.ERROR: _decode_error,
    SerialMessageType.IDENTITY: _decode_identity,
}
