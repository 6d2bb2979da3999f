"""rkckpt: the RKCKPT v1 checkpoint format, deltas, HDF5 wrapping and storage."""

from __future__ import annotations

from .errors import CheckpointError, DeltaMismatchError
from .model import Checkpoint, Chunk, ChunkType, Metadata, RegionInfo
from .siphash import region_id

__all__ = ["Checkpoint", "CheckpointError", "Chunk", "ChunkType", "DeltaMismatchError", "Metadata", "RegionInfo", "region_id"]
