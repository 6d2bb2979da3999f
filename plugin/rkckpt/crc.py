"""CRC-32 for rkckpt, from ISA-L (``isal``): one place that names the implementation.

ISA-L's CRC-32 is about 5x zlib's and, unlike Python's ``zlib`` module, it
exposes ``crc32_combine``: the writer takes the CRC of each raw chunk once and
combines them into the stream checksum instead of running a second pass over
(possibly) gigabytes of state.
"""

from __future__ import annotations

from isal.isal_zlib import crc32 as _crc32
from isal.isal_zlib import crc32_combine as _crc32_combine


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B given crc32(A), crc32(B) and len(B)."""
    if len2 <= 0:
        return crc1 & 0xFFFFFFFF
    return _crc32_combine(crc1, crc2, len2) & 0xFFFFFFFF


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return _crc32(data, value) & 0xFFFFFFFF
