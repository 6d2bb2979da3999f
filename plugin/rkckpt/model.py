"""In-memory checkpoint: metadata plus an ordered list of chunks.

Everything above the byte format (deltas, HDF5, storage, kernels) works on
these objects; only ``format`` knows how they are laid out in bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import IntEnum

import numpy as np

from .crc import crc32, crc32_combine
from .errors import CheckpointError
from .siphash import region_id

PARENT_DIGEST_KEY = "ringkernel.delta.parent_digest"
REGIONS_KEY = "rkckpt.regions"


class ChunkType(IntEnum):
    CONTROL_BLOCK = 1
    H2K_QUEUE = 2
    K2H_QUEUE = 3
    HLC_STATE = 4
    DEVICE_MEMORY = 5
    K2K_ROUTING = 6
    HALO_BUFFERS = 7
    TELEMETRY = 8
    CUSTOM = 100


#: Chunk types whose identity includes the chunk id (others occur once).
KEYED_TYPES = frozenset({int(ChunkType.DEVICE_MEMORY), int(ChunkType.CUSTOM)})


def chunk_identity(chunk_type: int, chunk_id: int) -> tuple[int, int | None]:
    return (chunk_type, chunk_id if chunk_type in KEYED_TYPES else None)


def type_name(chunk_type: int) -> str:
    try:
        return ChunkType(chunk_type).name
    except ValueError:
        return f"UNKNOWN_{chunk_type}"


@dataclass(frozen=True)
class Metadata:
    kernel_id: str
    kernel_type: str
    current_step: int
    grid_size: tuple[int, int, int] = (0, 0, 0)
    tile_size: tuple[int, int, int] = (0, 0, 0)
    hlc: tuple[int, int, int] = (0, 0, 0)
    custom: dict[str, str] = field(default_factory=dict)

    @property
    def parent_digest(self) -> str | None:
        return self.custom.get(PARENT_DIGEST_KEY)

    def with_custom(self, **updates: str | None) -> Metadata:
        custom = dict(self.custom)
        for k, v in updates.items():
            if v is None:
                custom.pop(k, None)
            else:
                custom[k] = v
        return replace(self, custom=custom)


@dataclass
class Chunk:
    """One chunk; ``data`` is always the *uncompressed* payload.

    ``flags`` records extension encodings (see ``flags.py``) that apply to
    ``data`` itself, e.g. a block-delta patch; compression flags are a
    property of the file, not of the in-memory chunk, and are dropped on read.
    """

    chunk_type: int
    chunk_id: int
    data: bytes | bytearray | memoryview
    flags: int = 0

    @property
    def identity(self) -> tuple[int, int | None]:
        return chunk_identity(self.chunk_type, self.chunk_id)

    @property
    def size(self) -> int:
        return memoryview(self.data).nbytes


@dataclass(frozen=True)
class RegionInfo:
    """Name, dtype and shape of a DeviceMemory region, kept in metadata."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunk_id: int

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "chunk_id": str(self.chunk_id)}


def _record(chunk_type: int, chunk_id: int) -> bytes:
    ident_id = chunk_id if chunk_type in KEYED_TYPES else 0
    return chunk_type.to_bytes(4, "little") + ident_id.to_bytes(8, "little") + b"\0\0\0\0"


def digest_records(chunks: Iterable[tuple[int, int, bytes | memoryview]]) -> str:
    """Content digest over (type, id, data) triples; see RKCKPT-FORMAT.md."""
    crc = 0
    for chunk_type, chunk_id, data in chunks:
        crc = crc32(_record(chunk_type, chunk_id), crc)
        crc = crc32(data, crc)  # ISA-L when installed: one pass, ~10x zlib's speed, GIL released
    return f"{crc & 0xFFFFFFFF:08x}"


def digest_from_crcs(chunks: Iterable[tuple[int, int, int, int]]) -> str:
    """``digest_records`` from (type, id, CRC-32 of data, data length): no second pass over the data."""
    crc = 0
    for chunk_type, chunk_id, data_crc, size in chunks:
        crc = crc32_combine(crc32(_record(chunk_type, chunk_id), crc), data_crc, size)
    return f"{crc:08x}"


@dataclass
class Checkpoint:
    metadata: Metadata
    chunks: list[Chunk] = field(default_factory=list)
    created_at: int = 0

    # ------------------------------------------------------------ identity
    def content_digest(self) -> str:
        return digest_records((c.chunk_type, c.chunk_id, c.data) for c in self.chunks)

    @property
    def is_delta(self) -> bool:
        return self.metadata.parent_digest is not None

    def find(self, chunk_type: int, chunk_id: int = 0) -> Chunk | None:
        ident = chunk_identity(chunk_type, chunk_id)
        for c in self.chunks:
            if c.identity == ident:
                return c
        return None

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    # ------------------------------------------------------------ regions
    def regions(self) -> dict[str, RegionInfo]:
        raw = self.metadata.custom.get(REGIONS_KEY)
        if not raw:
            return {}
        try:
            items = json.loads(raw)
            out = {}
            for it in items:
                info = RegionInfo(str(it["name"]), str(it["dtype"]), tuple(int(s) for s in it["shape"]), int(it["chunk_id"]))
                np.dtype(info.dtype)  # validates
                out[info.name] = info
            return out
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(None, f"metadata key {REGIONS_KEY!r} is malformed: {exc}") from None

    def add_region(self, name: str, array: np.ndarray, *, chunk_type: int = ChunkType.DEVICE_MEMORY) -> Chunk:
        """Store a named array as a DeviceMemory chunk and record dtype/shape."""
        arr = np.ascontiguousarray(array)
        cid = region_id(name)
        regions = self.regions()
        regions[name] = RegionInfo(name, arr.dtype.str, tuple(arr.shape), cid)
        self.metadata = self.metadata.with_custom(**{REGIONS_KEY: _regions_json(regions)})
        # reshape(-1).view(uint8): a byte view without copying; memoryview.cast refuses an
        # empty array with a 2-D shape (a series with no samples yet: --energy-every 0).
        chunk = Chunk(int(chunk_type), cid, memoryview(arr.reshape(-1).view(np.uint8)))
        existing = self.find(chunk_type, cid)
        if existing is not None:
            self.chunks[self.chunks.index(existing)] = chunk
        else:
            self.chunks.append(chunk)
        return chunk

    def region(self, name: str) -> np.ndarray:
        """The named region as a numpy array (read-only view when possible)."""
        info = self.regions().get(name)
        if info is None:
            raise KeyError(f"no region named {name!r} in checkpoint")
        chunk = self.find(ChunkType.DEVICE_MEMORY, info.chunk_id)
        if chunk is None:
            raise CheckpointError(None, f"region {name!r} is declared but its chunk is missing")
        dt = np.dtype(info.dtype)
        expected = int(np.prod(info.shape, dtype=np.int64)) * dt.itemsize
        if chunk.size != expected:
            raise CheckpointError(
                None, f"region {name!r}: {chunk.size} bytes stored, {expected} expected for {info.dtype}{list(info.shape)}"
            )
        return np.frombuffer(chunk.data, dtype=dt).reshape(info.shape)

    def region_names(self) -> dict[int, str]:
        return {info.chunk_id: name for name, info in self.regions().items()}


def _regions_json(regions: dict[str, RegionInfo]) -> str:
    items = [regions[k].to_json() for k in sorted(regions)]
    return json.dumps(items, sort_keys=True, separators=(",", ":"))
