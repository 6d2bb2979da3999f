"""``rkckpt apply``: materialise a chain into one full checkpoint."""

from __future__ import annotations

import click

from ..delta import apply_chain
from ..errors import CheckpointError
from ..flags import CHUNK_BLOCK_DELTA
from . import main
from .common import COMPRESS_CHOICES, about, check_out, errors_exit, load, save


@main.command("apply")
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("deltas", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Where to write the materialised state.")
@click.option("--compat", is_flag=True, help="Write what the reference reader parses.")
@click.option(
    "--compress", type=click.Choice(COMPRESS_CHOICES), default="auto", show_default=True, help="zstd policy (ignored with --compat)."
)
@errors_exit
def apply_cmd(base: str, deltas: tuple[str, ...], out: str, compat: bool, compress: str) -> None:
    """Materialise BASE + DELTA... (a chain, oldest first) into OUT."""
    check_out(out)
    state = load(base)
    if any(c.flags & CHUNK_BLOCK_DELTA for c in state.chunks):
        raise CheckpointError(base, "is a block-level delta, not a full state; give the chain's full checkpoint as BASE")
    for d in deltas:
        loaded = load(d)
        with about(d):
            state = apply_chain(state, [loaded], sources=[d])
    save(out, state, compat, compress)
