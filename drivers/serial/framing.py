"""Serial protocol v1 framing, without I/O: a frame is

    COBS( vt | seq | payload | crc32c ) 0x00

where ``vt`` is the version (high nibble) and message type (low nibble), ``seq`` a
big-endian u32 and the CRC-32C big-endian over everything before it. COBS removes every
0x00 from the frame so that 0x00 marks frame boundaries: after garbage, a lost byte or a
truncated frame the decoder resynchronises at the next 0x00.

``FrameDecoder`` never buffers more than ``MAX_ENCODED_FRAME_SIZE`` bytes: a run longer
than that is reported once as an oversize ``FrameError`` and skipped up to its delimiter.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..device_errors import FrameError
from .crc32c import crc32c
from .serial_constants import (
    CRC_SIZE,
    FRAME_HEADER_SIZE,
    MAX_ENCODED_FRAME_SIZE,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    SEQ_MODULUS,
)

__all__ = [
    "SerialFrame",
    "FrameDecoder",
    "FrameError",
    "cobs_decode",
    "cobs_encode",
    "decode_frame",
    "encode_frame",
]

_HEADER = struct.Struct(">BI")
_CRC = struct.Struct(">I")

# FrameError kinds, stable strings for logs and tests.
COBS = "cobs"
TOO_SHORT = "too-short"
OVERSIZE = "oversize"
BAD_CRC = "bad-crc"


@dataclass(frozen=True)
class SerialFrame:
    version: int  # high nibble of byte 0
    msg_type: int  # low nibble of byte 0
    seq: int
    payload: bytes


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing (Cheshire & Baker): the result has no 0x00 byte."""
    out = bytearray()
    segments = data.split(b"\x00")
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        # Each zero-free segment becomes blocks of at most 254 bytes. A full block (code
        # 0xFF) implies no zero after it, so the zero that ends the segment needs a block
        # of its own; after the final segment there is no zero, and no block is added.
        while len(segment) >= 254:
            out.append(0xFF)
            out += segment[:254]
            segment = segment[254:]
            if not segment and index == last:
                return bytes(out)
        out.append(len(segment) + 1)
        out += segment
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of ``cobs_encode``; raises FrameError on a 0x00 or a code past the end."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise FrameError(COBS, "0x00 inside a COBS frame")
        end = i + code
        if end > n:
            raise FrameError(COBS, "COBS block runs past the end of the frame")
        block = data[i + 1 : end]
        if 0 in block:
            raise FrameError(COBS, "0x00 inside a COBS frame")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(version: int, msg_type: int, seq: int, payload: bytes) -> bytes:
    """One complete frame on the wire, delimiter included."""
    if not 0 < version < 16 or not 0 < msg_type < 16:
        raise ValueError("version and message type must each fit in a nibble (1..15)")
    if not 0 <= seq < SEQ_MODULUS:
        raise ValueError("sequence number must be a u32")
    if len(payload) > MAX_FRAME_SIZE - MIN_FRAME_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the maximum frame size")
    body = _HEADER.pack((version << 4) | msg_type, seq) + payload
    body += _CRC.pack(crc32c(body))
    return cobs_encode(body) + b"\x00"


def decode_frame(encoded: bytes) -> SerialFrame:
    """Decode one frame given without its delimiter; raises FrameError."""
    if len(encoded) > MAX_ENCODED_FRAME_SIZE:
        raise FrameError(OVERSIZE, f"{len(encoded)} encoded bytes exceed the maximum")
    raw = cobs_decode(encoded)
    # Length is checked before any field is read.
    if len(raw) < MIN_FRAME_SIZE:
        raise FrameError(TOO_SHORT, f"{len(raw)} bytes is shorter than the minimum frame")
    if len(raw) > MAX_FRAME_SIZE:
        raise FrameError(OVERSIZE, f"{len(raw)} bytes exceed the maximum frame size")
    (crc,) = _CRC.unpack_from(raw, len(raw) - CRC_SIZE)
    if crc32c(memoryview(raw)[: len(raw) - CRC_SIZE]) != crc:
        raise FrameError(BAD_CRC, "CRC-32C mismatch")
    vt, seq = _HEADER.unpack_from(raw, 0)
    return SerialFrame(vt >> 4, vt & 0x0F, seq, raw[FRAME_HEADER_SIZE : len(raw) - CRC_SIZE])


class FrameDecoder:
    """Splits a byte stream at 0x00 delimiters and decodes each frame."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        # True while skipping the rest of an oversized run up to its delimiter.
        self._discarding = False

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived but not its delimiter."""
        return bool(self._buffer) or self._discarding

    @property
    def buffered(self) -> int:
        """Bytes held waiting for a delimiter (never above MAX_ENCODED_FRAME_SIZE)."""
        return len(self._buffer)

    def reset(self) -> None:
        self._buffer.clear()
        self._discarding = False

    def feed(self, data: bytes) -> list[SerialFrame | FrameError]:
        out: list[SerialFrame | FrameError] = []
        start = 0
        n = len(data)
        while start < n:
            end = data.find(b"\x00", start)
            tail = end < 0
            stop = n if tail else end
            if self._discarding:
                if not tail:
                    self._discarding = False
            elif len(self._buffer) + (stop - start) > MAX_ENCODED_FRAME_SIZE:
                # Checked before copying, so the buffer never grows past the cap.
                self._buffer.clear()
                out.append(FrameError(OVERSIZE, "no delimiter within the maximum frame size"))
                self._discarding = tail
            elif tail:
                self._buffer += data[start:stop]
            else:
                if self._buffer:
                    self._buffer += data[start:stop]
                    chunk = bytes(self._buffer)
                    self._buffer.clear()
                else:
                    chunk = data[start:stop]
                # Back-to-back delimiters are empty frames: senders use them to resync.
                if chunk:
                    try:
                        out.append(decode_frame(chunk))
                    except FrameError as exc:
                        out.append(exc)
            if tail:
                break
            start = end + 1
        return out
