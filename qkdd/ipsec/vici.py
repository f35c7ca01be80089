"""strongSwan's VICI protocol (the Versatile IKE Control Interface of charon), sans-IO.

This module owns the bytes: messages (a tree of sections, key/values and lists), packets
(a message with a type and, for named types, a name), the length-prefixed segments that
carry them over a stream socket, and the order of packets in one command
(:class:`CommandExchange`). Nothing here opens a socket or reads a clock;
``qkdd.ipsec.charon`` moves the bytes.

The format, as charon's vici plugin defines it (its README, "The Versatile IKE Control
Interface (VICI) protocol"):

- Transport: each segment is a 32-bit big-endian length, then that many bytes; at most
  512 KiB of data per segment.
- Packet: one byte of type; named types (CMD_REQUEST, EVENT_REGISTER, EVENT_UNREGISTER,
  EVENT) then carry an 8-bit name length and the name; the rest of the segment is the
  message.
- Message: a sequence of elements, each a type byte; SECTION_START, KEY_VALUE and
  LIST_START carry an 8-bit-length name; KEY_VALUE and LIST_ITEM carry a 16-bit
  big-endian-length value. Sections nest and must balance; lists hold items only.

Values are raw bytes; charon writes numbers and booleans as text ("yes"/"no").
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Union

from qkdd.errors import ViciError

MAX_SEGMENT: Final = 512 * 1024
_LENGTH = struct.Struct(">I")
_VALUE_LENGTH = struct.Struct(">H")
MAX_NAME: Final = 255
MAX_VALUE: Final = 65535
# Sections charon sends nest a few levels (list-sas: IKE_SA, child-sas, CHILD_SA); a
# message nested deeper than this is not from charon.
MAX_DEPTH: Final = 32


class PacketType:
    CMD_REQUEST: Final = 0
    CMD_RESPONSE: Final = 1
    CMD_UNKNOWN: Final = 2
    EVENT_REGISTER: Final = 3
    EVENT_UNREGISTER: Final = 4
    EVENT_CONFIRM: Final = 5
    EVENT_UNKNOWN: Final = 6
    EVENT: Final = 7


_NAMED = frozenset(
    {
        PacketType.CMD_REQUEST,
        PacketType.EVENT_REGISTER,
        PacketType.EVENT_UNREGISTER,
        PacketType.EVENT,
    }
)
_KNOWN = frozenset(range(8))


class Element:
    SECTION_START: Final = 1
    SECTION_END: Final = 2
    KEY_VALUE: Final = 3
    LIST_START: Final = 4
    LIST_ITEM: Final = 5
    LIST_END: Final = 6


# A decoded message: values are bytes, lists of bytes, or nested sections.
Value = Union[bytes, list[bytes], "Section"]
Section = dict[str, Value]


class ViciProtocolError(ViciError):
    """Bytes that are not a valid VICI segment, packet or message, or a packet out of
    order."""


class ViciEncodeError(ViciError, ValueError):
    """A message that VICI cannot carry (a name or value too long, a value of a type it
    has no encoding for)."""


# --------------------------------------------------------------------------------------
# Messages


def _value_bytes(value: object, where: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, bool):  # before int: bool is an int
        data = b"yes" if value else b"no"
    elif isinstance(value, int):
        data = str(value).encode()
    elif isinstance(value, str):
        data = value.encode()
    else:
        raise ViciEncodeError(f"{where}: no VICI encoding for a {type(value).__name__}")
    if len(data) > MAX_VALUE:
        raise ViciEncodeError(f"{where}: a value of {len(data)} bytes (at most {MAX_VALUE})")
    return data


def _name_bytes(name: object, where: str) -> bytes:
    if not isinstance(name, str):
        raise ViciEncodeError(f"{where}: a name must be text, got {type(name).__name__}")
    try:
        data = name.encode("ascii")
    except UnicodeEncodeError:
        raise ViciEncodeError(f"{where}: names are ASCII, got {name!r}") from None
    if not 1 <= len(data) <= MAX_NAME:
        raise ViciEncodeError(f"{where}: a name of 1-{MAX_NAME} bytes, got {len(data)}")
    return data


def _encode_into(out: bytearray, message: Mapping[str, object], path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ViciEncodeError(f"{path or 'message'}: sections nested deeper than {MAX_DEPTH}")
    for name, value in message.items():
        where = f"{path}{name}"
        encoded_name = _name_bytes(name, where)
        if isinstance(value, Mapping):
            out += bytes((Element.SECTION_START, len(encoded_name))) + encoded_name
            _encode_into(out, value, where + ".", depth + 1)
            out.append(Element.SECTION_END)
        elif isinstance(value, list | tuple):
            out += bytes((Element.LIST_START, len(encoded_name))) + encoded_name
            for index, item in enumerate(value):
                data = _value_bytes(item, f"{where}[{index}]")
                out.append(Element.LIST_ITEM)
                out += _VALUE_LENGTH.pack(len(data)) + data
            out.append(Element.LIST_END)
        else:
            data = _value_bytes(value, where)
            out += bytes((Element.KEY_VALUE, len(encoded_name))) + encoded_name
            out += _VALUE_LENGTH.pack(len(data)) + data


def encode_message(message: Mapping[str, object]) -> bytes:
    """The elements of ``message``: a mapping maps to a section, a list or tuple to a list,
    anything else (bytes, text, an integer, a bool as yes/no) to a key/value."""
    out = bytearray()
    _encode_into(out, message, "", 0)
    return bytes(out)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def left(self) -> int:
        return len(self.data) - self.offset

    def byte(self, what: str) -> int:
        if self.left() < 1:
            raise ViciProtocolError(f"message ends inside {what}")
        value = self.data[self.offset]
        self.offset += 1
        return value

    def take(self, size: int, what: str) -> bytes:
        if self.left() < size:
            raise ViciProtocolError(f"message ends inside {what}")
        value = self.data[self.offset : self.offset + size]
        self.offset += size
        return value

    def name(self) -> str:
        raw = self.take(self.byte("a name length"), "a name")
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise ViciProtocolError(f"a name that is not ASCII: {raw[:32]!r}") from None

    def value(self) -> bytes:
        (size,) = _VALUE_LENGTH.unpack(self.take(2, "a value length"))
        return self.take(size, "a value")


def decode_message(data: bytes) -> Section:
    """The tree ``data`` encodes; ViciProtocolError if it is not a valid message (unknown
    element, unbalanced section, a key twice in one section, truncated)."""
    cursor = _Cursor(data)
    root: Section = {}
    stack: list[Section] = [root]
    current_list: list[bytes] | None = None

    def put(name: str, value: Value) -> None:
        if name in stack[-1]:
            raise ViciProtocolError(f"key {name!r} twice in one section")
        stack[-1][name] = value

    while cursor.left():
        kind = cursor.byte("an element type")
        if current_list is not None:
            if kind == Element.LIST_ITEM:
                current_list.append(cursor.value())
            elif kind == Element.LIST_END:
                current_list = None
            else:
                raise ViciProtocolError(f"element type {kind} inside a list")
            continue
        if kind == Element.SECTION_START:
            if len(stack) > MAX_DEPTH:
                raise ViciProtocolError(f"sections nested deeper than {MAX_DEPTH}")
            section: Section = {}
            put(cursor.name(), section)
            stack.append(section)
        elif kind == Element.SECTION_END:
            if len(stack) == 1:
                raise ViciProtocolError("a section end without a section")
            stack.pop()
        elif kind == Element.KEY_VALUE:
            name = cursor.name()
            put(name, cursor.value())
        elif kind == Element.LIST_START:
            current_list = []
            put(cursor.name(), current_list)
        else:
            raise ViciProtocolError(f"element type {kind} outside a list")
    if current_list is not None:
        raise ViciProtocolError("message ends inside a list")
    if len(stack) != 1:
        raise ViciProtocolError("message ends inside a section")
    return root


# --------------------------------------------------------------------------------------
# Packets and segments


@dataclass(frozen=True)
class Packet:
    type: int
    name: str | None = None
    message: Section = field(default_factory=dict)


def encode_packet(kind: int, name: str | None = None, message: Mapping[str, object] = {}) -> bytes:
    """One segment: length, type, the name for named types, the message."""
    if kind not in _KNOWN:
        raise ViciEncodeError(f"unknown packet type {kind}")
    body = bytearray((kind,))
    if kind in _NAMED:
        encoded = _name_bytes(name, "packet name")
        body += bytes((len(encoded),)) + encoded
    elif name is not None:
        raise ViciEncodeError(f"packet type {kind} has no name")
    body += encode_message(message)
    if len(body) > MAX_SEGMENT:
        raise ViciEncodeError(f"a packet of {len(body)} bytes (at most {MAX_SEGMENT})")
    return _LENGTH.pack(len(body)) + bytes(body)


def decode_packet(body: bytes) -> Packet:
    """The packet in one segment's data (without its length)."""
    if not body:
        raise ViciProtocolError("an empty segment")
    kind = body[0]
    if kind not in _KNOWN:
        raise ViciProtocolError(f"unknown packet type {kind}")
    cursor = _Cursor(body)
    cursor.offset = 1
    name = cursor.name() if kind in _NAMED else None
    return Packet(kind, name, decode_message(body[cursor.offset :]))


class SegmentReader:
    """Splits a byte stream into packets. Checks each segment's length before buffering
    its data, so a peer that announces a huge segment is refused at once."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        self._buffer += data
        packets = []
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > MAX_SEGMENT:
                raise ViciProtocolError(f"a segment of {size} bytes (at most {MAX_SEGMENT})")
            end = _LENGTH.size + size
            if len(self._buffer) < end:
                break
            packets.append(decode_packet(bytes(self._buffer[_LENGTH.size : end])))
            del self._buffer[:end]
        return packets

    @property
    def pending(self) -> int:
        """Bytes of an incomplete segment held."""
        return len(self._buffer)


# --------------------------------------------------------------------------------------
# One command


class CommandUnknownError(ViciError):
    """charon has no such command (CMD_UNKNOWN) or no such event (EVENT_UNKNOWN)."""


class CommandExchange:
    """The packets of one command on a connection of its own.

    A command that streams its result as events (``list-sas`` sends ``list-sa`` events,
    ``list-conns`` sends ``list-conn``) first registers for the event, then sends the
    request; the events arrive before the response. Feed every packet that arrives to
    :meth:`receive`; it returns the bytes to send next (possibly none). Once
    :attr:`done`, :attr:`response` and :attr:`events` hold the result. The connection is
    closed after the command, which ends the registration, so no unregister is sent.
    """

    def __init__(
        self, command: str, arguments: Mapping[str, object] = {}, *, event: str | None = None
    ) -> None:
        self.command = command
        self.event = event
        self._request = encode_packet(PacketType.CMD_REQUEST, command, arguments)
        self._registering = event is not None
        self.response: Section | None = None
        self.events: list[Section] = []

    @property
    def done(self) -> bool:
        return self.response is not None

    def start(self) -> bytes:
        """The first bytes to send."""
        if self.event is not None:
            return encode_packet(PacketType.EVENT_REGISTER, self.event)
        return self._request

    def receive(self, packet: Packet) -> bytes:
        if self.done:
            raise ViciProtocolError(f"{self.command}: a packet after the response")
        if self._registering:
            if packet.type == PacketType.EVENT_CONFIRM:
                self._registering = False
                return self._request
            if packet.type == PacketType.EVENT_UNKNOWN:
                raise CommandUnknownError(f"charon has no event {self.event!r}")
            raise ViciProtocolError(
                f"{self.command}: packet type {packet.type} while registering for events"
            )
        if packet.type == PacketType.EVENT:
            if packet.name == self.event:
                self.events.append(packet.message)
            return b""  # an event of another registration on this connection: none here
        if packet.type == PacketType.CMD_RESPONSE:
            self.response = packet.message
            return b""
        if packet.type == PacketType.CMD_UNKNOWN:
            raise CommandUnknownError(f"charon has no command {self.command!r}")
        raise ViciProtocolError(f"{self.command}: unexpected packet type {packet.type}")


# --------------------------------------------------------------------------------------
# Reading values


def text(section: Mapping[str, Value], key: str, default: str | None = None) -> str | None:
    """A key/value of ``section`` as text (charon writes UTF-8), or ``default``."""
    value = section.get(key)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return default


def sections(section: Mapping[str, Value], key: str | None = None) -> Iterable[tuple[str, Section]]:
    """The named subsections of ``section`` (or of its subsection ``key``)."""
    parent: object = section if key is None else section.get(key)
    if not isinstance(parent, dict):
        return []
    return [(name, value) for name, value in parent.items() if isinstance(value, dict)]
