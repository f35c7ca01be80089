"""Serial framing without I/O: CRC-32C and COBS known answers, frame codec, and a decoder
that resynchronises after damage and never buffers beyond its cap."""

from __future__ import annotations

import os
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdd_drivers.serial.crc32c import CHECK_VALUE, crc32c, crc32c_native, crc32c_python
from qkdd_drivers.serial.framing import (
    BAD_CRC,
    COBS,
    OVERSIZE,
    TOO_SHORT,
    FrameDecoder,
    FrameError,
    SerialFrame,
    cobs_decode,
    cobs_encode,
    decode_frame,
    encode_frame,
)
from qkdd_drivers.serial.serial_constants import (
    MAX_ENCODED_FRAME_SIZE,
    MAX_FRAME_SIZE,
    MAX_PAYLOAD_SIZE,
    MIN_FRAME_SIZE,
)

# -- CRC-32C ---------------------------------------------------------------------------


IMPLEMENTATIONS = [
    pytest.param(crc32c_python, id="python"),
    pytest.param(
        crc32c_native,
        id="c",
        marks=pytest.mark.skipif(crc32c_native is None, reason="google-crc32c's C code missing"),
    ),
]


def test_the_framing_uses_the_c_implementation_where_installed() -> None:
    assert crc32c is (crc32c_native or crc32c_python)


@pytest.mark.parametrize("crc", IMPLEMENTATIONS)
def test_crc32c_check_value(crc) -> None:
    assert CHECK_VALUE == 0xE3069283
    assert crc(b"123456789") == CHECK_VALUE


@pytest.mark.parametrize("crc", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # RFC 3720 (iSCSI) appendix B.4 test vectors.
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"", 0),
    ],
)
def test_crc32c_rfc3720_vectors(crc, data: bytes, expected: int) -> None:
    assert crc(data) == expected


@pytest.mark.parametrize("crc", IMPLEMENTATIONS)
def test_crc32c_continues_over_chunks(crc) -> None:
    data = os.urandom(1000)
    assert crc(data[400:], crc(data[:400])) == crc(data)
    assert crc(memoryview(data)[400:], crc(bytearray(data[:400]))) == crc(data)


@pytest.mark.skipif(crc32c_native is None, reason="google-crc32c's C code missing")
@given(st.binary(max_size=5000), st.integers(0, 0xFFFFFFFF))
def test_c_and_python_implementations_agree(data: bytes, start: int) -> None:
    assert crc32c_native is not None
    assert crc32c_native(data, start) == crc32c_python(data, start)


# -- COBS ------------------------------------------------------------------------------

COBS_VECTORS = [
    # The examples of Cheshire & Baker's encoding as usually tabulated.
    ("00", "0101"),
    ("0000", "010101"),
    ("001100", "01021101"),
    ("11220033", "0311220233"),
    ("11223344", "0511223344"),
    ("11000000", "0211010101"),
    (bytes(range(1, 255)).hex(), "ff" + bytes(range(1, 255)).hex()),
    (bytes(range(0, 255)).hex(), "01ff" + bytes(range(1, 255)).hex()),
    (bytes(range(1, 256)).hex(), "ff" + bytes(range(1, 255)).hex() + "02ff"),
    (bytes(range(2, 256)).hex() + "00", "ff" + bytes(range(2, 256)).hex() + "0101"),
    (bytes(range(3, 256)).hex() + "0001", "fe" + bytes(range(3, 256)).hex() + "0201"),
]


@pytest.mark.parametrize(("raw", "encoded"), COBS_VECTORS)
def test_cobs_known_answers(raw: str, encoded: str) -> None:
    assert cobs_encode(bytes.fromhex(raw)).hex() == encoded
    assert cobs_decode(bytes.fromhex(encoded)) == bytes.fromhex(raw)


@given(st.binary(max_size=2000))
def test_cobs_roundtrip_has_no_zero_and_bounded_overhead(data: bytes) -> None:
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert len(encoded) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(encoded) == data


@pytest.mark.parametrize("bad", ["0511", "0300", "02"])
def test_cobs_decode_rejects_bad_codes(bad: str) -> None:
    with pytest.raises(FrameError) as info:
        cobs_decode(bytes.fromhex(bad))
    assert info.value.kind == COBS


# -- frames ----------------------------------------------------------------------------


def test_frame_roundtrip_and_layout() -> None:
    wire = encode_frame(1, 3, 0x01020304, b"\xaa\x00\xbb")
    assert wire.endswith(b"\x00") and 0 not in wire[:-1]
    raw = cobs_decode(wire[:-1])
    assert raw[0] == 0x13  # version nibble 1, type nibble 3
    assert raw[1:5] == bytes.fromhex("01020304")
    assert raw[5:-4] == b"\xaa\x00\xbb"
    assert int.from_bytes(raw[-4:], "big") == crc32c(raw[:-4])
    assert decode_frame(wire[:-1]) == SerialFrame(1, 3, 0x01020304, b"\xaa\x00\xbb")


def test_largest_frame_fits_the_caps() -> None:
    wire = encode_frame(1, 3, 7, b"\x01" * MAX_PAYLOAD_SIZE)
    assert len(wire) - 1 <= MAX_ENCODED_FRAME_SIZE
    assert FrameDecoder().feed(wire) == [SerialFrame(1, 3, 7, b"\x01" * MAX_PAYLOAD_SIZE)]
    with pytest.raises(ValueError):
        encode_frame(1, 3, 7, b"\x01" * (MAX_PAYLOAD_SIZE + 1))


@pytest.mark.parametrize(
    ("version", "msg_type", "seq"),
    [(0, 1, 0), (16, 1, 0), (1, 0, 0), (1, 16, 0), (1, 1, -1), (1, 1, 1 << 32)],
)
def test_encode_frame_rejects_out_of_range_fields(version: int, msg_type: int, seq: int) -> None:
    with pytest.raises(ValueError):
        encode_frame(version, msg_type, seq, b"")


def test_decode_checks_length_before_fields() -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(cobs_encode(b"\x11\x00\x00\x00"))
    assert info.value.kind == TOO_SHORT
    with pytest.raises(FrameError) as info:
        decode_frame(cobs_encode(b"\x11" * (MAX_FRAME_SIZE + 1)))
    assert info.value.kind == OVERSIZE


def test_decode_rejects_any_single_bit_flip() -> None:
    wire = bytearray(encode_frame(1, 2, 5, os.urandom(40)))
    for i in range(len(wire) - 1):
        for bit in range(8):
            damaged = bytearray(wire)
            damaged[i] ^= 1 << bit
            # A flip may create a 0x00 (a cut) — either way no frame may come out.
            assert not any(isinstance(x, SerialFrame) for x in FrameDecoder().feed(bytes(damaged)))


# -- the stream decoder ----------------------------------------------------------------


def _frames(n: int) -> list[SerialFrame]:
    return [SerialFrame(1, 1 + i % 5, i, os.urandom(i * 7 % 300)) for i in range(n)]


def _wire(frames: list[SerialFrame]) -> bytes:
    return b"".join(encode_frame(f.version, f.msg_type, f.seq, f.payload) for f in frames)


def test_decoder_byte_at_a_time() -> None:
    frames = _frames(10)
    decoder = FrameDecoder()
    out = []
    for b in _wire(frames):
        out += decoder.feed(bytes([b]))
    assert out == frames
    assert not decoder.in_frame


def test_decoder_resyncs_after_garbage_truncation_and_crc_error() -> None:
    good = _frames(3)
    corrupt = bytearray(encode_frame(1, 3, 9, b"secret-looking payload"))
    corrupt[5] ^= 0x40 if corrupt[5] != 0x40 else 0x01  # never turns into 0x00
    truncated = encode_frame(1, 3, 10, os.urandom(100))[:40]
    stream = (
        b"\x13\x37garbage\xff\xfe"  # noise, joined to the next frame until its delimiter
        + b"\x00"
        + _wire(good[:1])
        + bytes(corrupt)
        + truncated  # cut short: runs into the next frame, which is lost with it
        + _wire([SerialFrame(1, 4, 11, b"lost with the truncated one")])
        + _wire(good[1:])
    )
    out = FrameDecoder().feed(stream)
    assert [x for x in out if isinstance(x, SerialFrame)] == good
    errors = [x for x in out if isinstance(x, FrameError)]
    assert len(errors) == 3
    assert errors[1].kind == BAD_CRC


def test_decoder_skips_oversized_run_once_and_resyncs() -> None:
    decoder = FrameDecoder()
    out = []
    for _ in range(10):
        out += decoder.feed(b"\x01" * 1000)
        assert decoder.buffered <= MAX_ENCODED_FRAME_SIZE
    assert decoder.in_frame
    out += decoder.feed(b"\x00" + _wire(_frames(2)))
    assert [x.kind for x in out if isinstance(x, FrameError)] == [OVERSIZE]
    assert [(x.msg_type, x.seq) for x in out if isinstance(x, SerialFrame)] == [(1, 0), (2, 1)]


def test_empty_frames_are_ignored() -> None:
    assert FrameDecoder().feed(b"\x00\x00\x00") == []


def test_decoder_memory_stays_under_the_cap() -> None:
    chunk = b"\x5a" * 65536
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(32):  # 2 MiB without a delimiter
            decoder.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.buffered <= MAX_ENCODED_FRAME_SIZE
    assert peak - base < 3 * MAX_ENCODED_FRAME_SIZE


# -- fuzzing ---------------------------------------------------------------------------

frames_st = st.builds(
    SerialFrame,
    st.integers(1, 15),
    st.integers(1, 15),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=MAX_PAYLOAD_SIZE),
)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=6000), max_size=8))
def test_arbitrary_bytes_never_crash_or_overallocate(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        for item in decoder.feed(chunk):
            assert isinstance(item, SerialFrame | FrameError)
            if isinstance(item, SerialFrame):
                assert MIN_FRAME_SIZE + len(item.payload) <= MAX_FRAME_SIZE
        assert decoder.buffered <= MAX_ENCODED_FRAME_SIZE


@settings(max_examples=100)
@given(st.lists(frames_st, min_size=1, max_size=4), st.data())
def test_frames_survive_any_chunking(frames: list[SerialFrame], data: st.DataObject) -> None:
    wire = _wire(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = FrameDecoder()
    out = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed(wire[prev:cut])
        prev = cut
    assert out == frames


@settings(max_examples=150)
@given(st.binary(max_size=3000), frames_st)
def test_frame_after_garbage_is_recovered(garbage: bytes, frame: SerialFrame) -> None:
    # A sender that starts with 0x00 (as every HELLO does) is always understood.
    out = FrameDecoder().feed(garbage + b"\x00" + _wire([frame]))
    assert out[-1] == frame
