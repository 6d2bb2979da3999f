"""Helpers shared by the codec/HDF5/CLI tests (not a fixture module).

Reading goes through ``rkckpt.container``, so the tests exercise the same
entry points the rest of the project uses.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from rkckpt import codec, container
from rkckpt.flags import CHUNK_ZSTD
from rkckpt.model import Checkpoint, Chunk, ChunkType, Metadata

VECTOR_FILES = ("full_step1000", "delta_step1010", "delta_step1020")


def parse_path(path: str | os.PathLike[str]) -> container.ParsedFile:
    """Parse a .rkcp or .rk.h5 file the way the project does."""
    return container.read(path)


def load_path(path: str | os.PathLike[str]) -> Checkpoint:
    return container.load(path)


def fix_checksum(buf: bytes | bytearray) -> bytearray:
    """Recompute the header checksum so the deeper parser gets to run."""
    out = bytearray(buf)
    if len(out) >= 64:
        struct.pack_into("<I", out, 32, zlib.crc32(bytes(out[64:])) & 0xFFFFFFFF)
    return out


def fix_total(buf: bytes | bytearray) -> bytearray:
    """Set total_size to the reference quirk (length - 8) and fix the checksum."""
    out = bytearray(buf)
    struct.pack_into("<Q", out, 16, len(out) - 8)
    return fix_checksum(out)


def sample_checkpoint(step: int = 7, n: int = 4096, seed: int = 0) -> Checkpoint:
    """A small checkpoint with named float regions, a control block and a custom chunk."""
    rng = np.random.default_rng(seed)
    ck = Checkpoint(
        Metadata("sample-0", "fdtd_3d", step, (16, 16, 16), (8, 8, 8), (1, 2, 3), {"dt": "0.5"}), created_at=1_700_000_000_000_000
    )
    ck.chunks.append(Chunk(int(ChunkType.CONTROL_BLOCK), 0, bytes(range(128))))
    x = np.linspace(0, 20, n, dtype=np.float32)
    ck.add_region("pressure", (np.sin(x) * np.exp(-x / 10)).reshape(-1, 16))
    ck.add_region("velocity", rng.standard_normal(n).astype(np.float64))
    ck.add_region("mask", np.zeros(n, dtype=np.uint8))
    ck.chunks.append(Chunk(int(ChunkType.CUSTOM), 42, b"custom payload"))
    return ck


def small_options(**kw: object) -> codec.WriteOptions:
    """Extended options that compress whenever it shrinks the data.

    The default ("speed") stores raw when compressing would be slower than
    the disk, which on a small machine means always; tests that need zstd
    chunks ask for "size".
    """
    try:
        return codec.WriteOptions(adaptive="size", **kw)  # type: ignore[call-arg]
    except TypeError:
        return codec.WriteOptions(**kw)  # type: ignore[arg-type]


def zstd_supported() -> bool:
    """True once the codec compresses (the codec engineer's zstd extension)."""
    data = memoryview(bytes(1 << 16))
    flags, _ = codec.encode_payload(data, 0, small_options())
    return bool(flags & CHUNK_ZSTD)


def vector_bytes(vectors_dir: Path, name: str) -> bytes:
    return (vectors_dir / f"{name}.rkcp").read_bytes()


def stream_span(data: bytes) -> tuple[int, int]:
    """Where the RKCKPT stream lies in a checkpoint file's bytes: the whole of a .rkcp,
    the /rkckpt dataset of a .rk.h5 (so tests can damage the stream either way)."""
    if not data.startswith(container.HDF5_SIGNATURE):
        return 0, len(data)
    import io

    import h5py

    with h5py.File(io.BytesIO(data), "r") as f:
        ds = f["rkckpt"]
        start = int(ds.id.get_offset())
        return start, start + int(ds.shape[0])
