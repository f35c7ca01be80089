"""CRC-32C (Castagnoli, iSCSI/RFC 3720) for the serial framing.

Reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF; the check value
for b"123456789" is 0xE3069283.

``crc32c`` is Google's C implementation (the ``google-crc32c`` package, hardware CRC where
the CPU has it) when that is installed with its C extension: about a thousand times faster
than Python on a 4 KB frame, which matters at device line rates. Otherwise it is
``crc32c_python``, table-driven: four 256-entry tables let the main loop take 4 bytes per
step ("slicing-by-4"), about twice as fast in CPython as one byte per step; the 4-byte
words are read little-endian, so big-endian hosts use the byte loop throughout. The tests
check that both give the same results.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

POLYNOMIAL = 0x82F63B78
CHECK_VALUE = 0xE3069283  # crc32c(b"123456789")


def _make_tables() -> tuple[list[int], list[int], list[int], list[int]]:
    t0 = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ POLYNOMIAL if crc & 1 else crc >> 1
        t0.append(crc)
    # t[k][b]: CRC contribution of byte b followed by k zero bytes.
    t1 = [(t0[i] >> 8) ^ t0[t0[i] & 0xFF] for i in range(256)]
    t2 = [(t1[i] >> 8) ^ t0[t1[i] & 0xFF] for i in range(256)]
    t3 = [(t2[i] >> 8) ^ t0[t2[i] & 0xFF] for i in range(256)]
    return t0, t1, t2, t3


_T0, _T1, _T2, _T3 = _make_tables()
_WORDS = sys.byteorder == "little" and memoryview(bytes(4)).cast("I").itemsize == 4


def crc32c_python(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue over more data."""
    t0, t1, t2, t3 = _T0, _T1, _T2, _T3
    crc ^= 0xFFFFFFFF
    view = memoryview(data).cast("B")
    aligned = len(view) & ~3 if _WORDS else 0
    if aligned:
        for word in view[:aligned].cast("I"):
            crc ^= word
            crc = t3[crc & 0xFF] ^ t2[(crc >> 8) & 0xFF] ^ t1[(crc >> 16) & 0xFF] ^ t0[crc >> 24]
    for byte in view[aligned:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _native() -> Callable[[bytes | bytearray | memoryview, int], int] | None:
    """Google's C CRC-32C, if installed with its C extension (not its Python fallback)."""
    try:
        import google_crc32c
    except ImportError:
        return None
    if google_crc32c.implementation != "c":
        return None
    extend = google_crc32c.extend

    def crc32c_native(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        # It takes read-only bytes only: a memoryview or bytearray is copied (cheap next
        # to the pure-Python loop it replaces).
        return int(extend(crc, data if isinstance(data, bytes) else bytes(data)))

    return crc32c_native


crc32c_native = _native()
crc32c: Callable[..., int] = crc32c_native or crc32c_python
IMPLEMENTATION = "c" if crc32c_native is not None else "python"
