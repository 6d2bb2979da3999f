"""Region ids: the reference's ``DeviceMemory`` chunk ids, from the ``siphash24`` package.

The reference derives region ids from Rust's ``DefaultHasher`` (SipHash-1-3,
keys 0) over ``name + b"\\xff"``. The interpreter's own siphash13 is keyed
randomly per process, so the keyed implementation comes from ``siphash24``.
"""

from __future__ import annotations

import siphash24

_ZERO_KEY = bytes(16)


def siphash13(data: bytes, k0: int = 0, k1: int = 0) -> int:
    """SipHash-1-3 of ``data`` with the 128-bit key ``k0 | k1 << 64``, as an unsigned 64-bit integer."""
    key = _ZERO_KEY if not (k0 or k1) else k0.to_bytes(8, "little") + k1.to_bytes(8, "little")
    return int.from_bytes(siphash24.siphash13(data, key=key).digest(), "little")


def region_id(name: str) -> int:
    """The DeviceMemory ``chunk_id`` the reference assigns to a region name."""
    return siphash13(name.encode("utf-8") + b"\xff")
