"""Byte-level encoding shared by every peer message: frame header, fields, size caps.

A frame is ``version (1) | type (1) | body length (4, big-endian) | body``. The header is
checked, and the length against the cap for the current state, before any body byte is
parsed or buffered, so an unauthenticated peer cannot make us hold more than the cap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from qkdd.peer.peer_errors import RemoteProtocolError, VersionMismatch

# Version 3: a KEY_BATCH is thousands of keys of one SAE pair named by a run of QKD keys,
# with derived key IDs, and several batches fly at once (docs/protocol.md §5). Version 2
# (QKD_HORIZON with the sender's newest key, QKD_SKIP) named every key; the versions do not
# mix, and a peer of another version is refused with both numbers in the log.
PROTOCOL_VERSION: Final = 3
SUPPORTED_VERSIONS: Final = (3,)


def version_mismatch(theirs: object) -> str:
    """The reason given when a peer speaks another version of the peer protocol."""
    return (
        f"the peer speaks qkdd peer protocol version {theirs}, this daemon speaks version "
        f"{PROTOCOL_VERSION}: run the same qkdd release at both sites"
    )


FRAME_HEADER = struct.Struct(">BBI")
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size  # 6

# Before authentication only handshake frames are accepted, all well under 8 KiB
# (the largest is RESPONSE: 1088-byte ciphertext + 3309-byte signature + ~100 bytes).
MAX_HANDSHAKE_BODY: Final = 8 * 1024
# After authentication: the largest message is a peer call carrying one application
# message (capped at 1 MiB) with its framing (MAX_CALL_BODY), plus the AEAD tag.
MAX_SESSION_BODY: Final = 1024 * 1024 + 72 * 1024

NONCE_SIZE: Final = 32
MAX_ID_LENGTH: Final = 64


class FrameType:
    HELLO: Final = 0x01
    RESPONSE: Final = 0x02
    FINISH: Final = 0x03
    DATA: Final = 0x10
    KEY_UPDATE: Final = 0x11


@dataclass(frozen=True)
class Frame:
    type: int
    header: bytes
    body: bytes

    def encode(self) -> bytes:
        return self.header + self.body


def make_frame(frame_type: int, body: bytes) -> Frame:
    return Frame(frame_type, FRAME_HEADER.pack(PROTOCOL_VERSION, frame_type, len(body)), body)


class FrameBuffer:
    """Accumulates stream bytes and yields whole frames, enforcing the size cap."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.max_body = MAX_HANDSHAKE_BODY

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data
        # Refuse early: a header announcing an oversized body is rejected before the body
        # arrives, and no more than one header plus the cap is ever held.
        if len(self._buffer) >= FRAME_HEADER_SIZE:
            self._check_header(bytes(self._buffer[:FRAME_HEADER_SIZE]))

    def _check_header(self, header: bytes) -> int:
        version, _frame_type, length = FRAME_HEADER.unpack(header)
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(version_mismatch(version))
        if length > self.max_body:
            raise RemoteProtocolError(
                f"frame body of {length} bytes exceeds the cap {self.max_body}"
            )
        return int(length)

    def next_frame(self) -> Frame | None:
        if len(self._buffer) < FRAME_HEADER_SIZE:
            return None
        header = bytes(self._buffer[:FRAME_HEADER_SIZE])
        length = self._check_header(header)
        end = FRAME_HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[FRAME_HEADER_SIZE:end])
        del self._buffer[:end]
        return Frame(header[1], header, body)

    @property
    def pending(self) -> int:
        return len(self._buffer)


class Writer:
    """Builds a message body field by field."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(struct.pack(">B", value))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(struct.pack(">H", value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(struct.pack(">I", value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(struct.pack(">Q", value))
        return self

    def fixed(self, data: bytes, size: int) -> Writer:
        if len(data) != size:
            raise ValueError(f"field must be {size} bytes, not {len(data)}")
        self._parts.append(data)
        return self

    def text(self, value: str) -> Writer:
        raw = value.encode()
        if len(raw) > MAX_ID_LENGTH:
            raise ValueError("identifier too long")
        self._parts.append(struct.pack(">B", len(raw)) + raw)
        return self

    def blob(self, data: bytes) -> Writer:
        self._parts.append(struct.pack(">I", len(data)) + data)
        return self

    def build(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Parses a message body; every read checks the remaining length first."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    def _take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise RemoteProtocolError(f"{self._what}: truncated")
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self._take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def text(self) -> str:
        length = self.u8()
        if length > MAX_ID_LENGTH:
            raise RemoteProtocolError(f"{self._what}: identifier too long")
        try:
            return self._take(length).decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{self._what}: identifier is not UTF-8") from None

    def blob(self, max_size: int) -> bytes:
        length = self.u32()
        if length > max_size:
            raise RemoteProtocolError(f"{self._what}: field of {length} bytes exceeds {max_size}")
        return self._take(length)

    def rest(self) -> bytes:
        """Everything not read yet (an opaque tail)."""
        return self._take(len(self._data) - self._offset)

    @property
    def consumed(self) -> int:
        return self._offset

    def end(self) -> None:
        if self._offset != len(self._data):
            raise RemoteProtocolError(
                f"{self._what}: {len(self._data) - self._offset} trailing bytes"
            )
