"""``rkckpt convert``: .rkcp <-> .rk.h5."""

from __future__ import annotations

import click

from . import main
from .common import COMPRESS_CHOICES, check_out, errors_exit, load, refuse_compat_delta, save


@main.command("convert")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--compat", is_flag=True, help="Write what the reference reader parses (no compression, whole chunks).")
@click.option(
    "--compress", type=click.Choice(COMPRESS_CHOICES), default="auto", show_default=True, help="zstd policy (ignored with --compat)."
)
@errors_exit
def convert_cmd(src: str, dst: str, compat: bool, compress: str) -> None:
    """Convert between .rkcp and .rk.h5 (chosen by OUT's extension)."""
    check_out(dst)
    ckpt = load(src)
    refuse_compat_delta(src, ckpt, compat)
    save(dst, ckpt, compat, compress)
