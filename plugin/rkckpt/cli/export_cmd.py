"""``rkckpt export``: one region (or one chunk's bytes) as .npy."""

from __future__ import annotations

import click
import numpy as np

from .. import forms, h5read
from ..atomic import atomic_open
from ..errors import CheckpointError
from ..flags import CHUNK_BLOCK_DELTA
from ..model import Checkpoint, ChunkType
from . import main
from .common import about, errors_exit, load


@main.command("export")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--region", "region", help="Region name to export (dtype and shape from the checkpoint).")
@click.option("--chunk-id", "chunk_id", type=int, help="Chunk id to export as raw uint8 (for unnamed regions).")
@click.option("--chunk-type", "chunk_type", type=int, default=None, help="Chunk type, when several chunks share the id.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Output .npy file.")
@errors_exit
def export_cmd(path: str, region: str | None, chunk_id: int | None, chunk_type: int | None, out: str) -> None:
    """Write one region (or one chunk's bytes) of PATH to a .npy file."""
    if (region is None) == (chunk_id is None):
        raise click.UsageError("give exactly one of --region NAME or --chunk-id ID")
    with about(path):
        if forms.sniff_path(path) is forms.H5:
            h5read.probe(path)
            if region is not None:
                arr = h5read.read_region(path, region)
            else:
                arr = np.frombuffer(h5read.read_chunk(path, chunk_id, chunk_type), dtype=np.uint8)  # type: ignore[arg-type]
        else:
            arr = _export_from(path, load(path), region, chunk_id, chunk_type)
    with about(out), atomic_open(out) as fh:
        np.save(fh, arr, allow_pickle=False)


def _export_from(path: str, ckpt: Checkpoint, region: str | None, chunk_id: int | None, chunk_type: int | None) -> np.ndarray:
    if region is not None:
        info = ckpt.regions().get(region)
        if info is None:
            known = ", ".join(sorted(ckpt.regions())) or "none"
            raise CheckpointError(path, f"no region named {region!r} (known: {known})")
        chunk = ckpt.find(ChunkType.DEVICE_MEMORY, info.chunk_id)
        if chunk is not None and chunk.flags & CHUNK_BLOCK_DELTA:
            raise CheckpointError(path, f"region {region!r} is stored as a block-delta patch; apply the chain first")
        return ckpt.region(region)
    matches = [c for c in ckpt.chunks if c.chunk_id == chunk_id and (chunk_type is None or c.chunk_type == chunk_type)]
    if not matches:
        raise CheckpointError(path, f"no chunk with id {chunk_id}")
    if len(matches) > 1:
        raise CheckpointError(path, f"{len(matches)} chunks have id {chunk_id}; give --chunk-type too")
    if matches[0].flags & CHUNK_BLOCK_DELTA:
        raise CheckpointError(path, f"chunk {chunk_id} is a block-delta patch; apply the chain first")
    return np.frombuffer(matches[0].data, dtype=np.uint8)
