"""CRC-32C (Castagnoli, iSCSI/RFC 3720), table-driven in pure Python.

Reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF; the check value
for b"123456789" is 0xE3069283. Used once per frame, so a byte-at-a-time table is enough.
"""

from __future__ import annotations

POLYNOMIAL = 0x82F63B78
CHECK_VALUE = 0xE3069283  # crc32c(b"123456789")


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue over more data."""
    table = _TABLE
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
