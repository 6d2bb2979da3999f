"""``rkckpt inspect|verify|convert|apply|export``: one file in, facts or a file out.

Every failure ends as one line on stderr naming the file and exit status 1
(2 for usage errors, from click); no traceback reaches the user unless
``RKCKPT_DEBUG=1`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np

from .. import codec, format, hdf5
from .. import io as rkio
from ..atomic import atomic_open
from ..delta import apply_chain
from ..display import printable
from ..errors import CheckpointError
from ..flags import CHUNK_BLOCK_DELTA
from ..inspect import describe
from ..model import Checkpoint, ChunkType, type_name
from . import main

F = TypeVar("F", bound=Callable[..., Any])
H5_SUFFIXES = (".rk.h5", ".h5", ".hdf5")


# ------------------------------------------------------------------ plumbing


@contextlib.contextmanager
def _about(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn any failure while handling ``path`` into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError as exc:
        if exc.source is None:
            raise CheckpointError(path, exc.problem) from None
        raise
    except OSError as exc:
        raise CheckpointError(exc.filename or path, exc.strerror or str(exc)) from None
    except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
        raise
    except Exception as exc:
        if os.environ.get("RKCKPT_DEBUG") == "1":
            raise
        raise CheckpointError(path, f"{type(exc).__name__}: {exc}") from None


def _one_line(message: str) -> str:
    return " ".join(message.split("\n"))


def _fail(message: str) -> None:
    click.echo(f"rkckpt: error: {printable(_one_line(message))}", err=True)


def _errors_exit(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CheckpointError as exc:
            _fail(str(exc))
            raise click.exceptions.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _is_h5_name(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).lower().endswith(H5_SUFFIXES)


def _parse(path: str, *, deep: bool = False) -> tuple[format.ParsedFile, dict[int, str]]:
    """Parse ``path`` (.rkcp or .rk.h5, by content); also return index names."""
    with _about(path):
        if hdf5.is_hdf5(path):
            hdf5.probe(path)  # a damaged HDF5 structure can crash libhdf5: try it in a child first
            parsed = hdf5.check_h5(path) if deep else hdf5.read_h5(path)
            names = {e.chunk_id: e.name for e in hdf5.read_index(path) if e.name}
            return parsed, names
        if _is_h5_name(path) and os.path.exists(path):
            raise CheckpointError(path, "not an HDF5 file (no HDF5 signature)")
        return rkio.parse_file(path), {}  # plain or sharded .rkcp, streaming


def _load(path: str) -> Checkpoint:
    return _parse(path)[0].checkpoint


COMPRESS_CHOICES = ("auto", "always", "never")


def _options(compat: bool, compress: str = "auto") -> codec.WriteOptions:
    """``auto``: the codec's default (compress only when that is not slower than
    the disk); ``always``: whenever it makes the file smaller; ``never``: raw."""
    if compat:
        return codec.COMPAT
    extra: dict[str, Any] = {"auto": {}, "always": {"adaptive": "size"}, "never": {"compress": False}}[compress]
    try:
        return codec.WriteOptions(**extra)
    except TypeError:  # an older codec without these knobs
        return codec.WriteOptions()


def _atomic_write(target: Path, write: Callable[[Any], None]) -> None:
    with atomic_open(target) as fh:
        write(fh)


def _check_out(path: str) -> None:
    if not (_is_h5_name(path) or path.endswith(".rkcp")):
        raise click.BadParameter(f"{path}: output must end in .rkcp or .rk.h5", param_hint="OUT")


def _save(path: str, ckpt: Checkpoint, compat: bool, compress: str = "auto") -> int:
    options = _options(compat, compress)
    with _about(path):
        if compat and any(c.flags & CHUNK_BLOCK_DELTA for c in ckpt.chunks):
            raise CheckpointError(
                path, "--compat cannot hold block-delta chunks: apply the delta to its base first (rkckpt apply BASE DELTA -o OUT --compat)"
            )
        _check_out(path)
        if _is_h5_name(path):
            return hdf5.write_h5(path, ckpt, options)
        return int(rkio.save(path, ckpt, options))  # atomic, streaming, shards states over 1 GiB


# ------------------------------------------------------------------ commands


@main.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@_errors_exit
def inspect_cmd(path: str, as_json: bool) -> None:
    """Show the header, metadata and chunks of a .rkcp or .rk.h5 file."""
    parsed, names = _parse(path)
    with _about(path):
        info = describe(parsed, names)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    _print_table(path, info)


def _print_table(path: str, info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: don't fold ids and names at 80 columns
        console = Console(width=160)
    h, m = info["header"], info["metadata"]
    console.print(
        f"[bold]{escape(printable(path))}[/bold]  RKCKPT v{h['version']}  {h['total_size']} bytes  digest [cyan]{info['content_digest']}[/cyan]"
    )
    console.print(
        f"kernel [bold]{escape(printable(m['kernel_id']))}[/bold] ({escape(printable(m['kernel_type']))})  step {m['current_step']}  grid {tuple(m['grid_size'])}  tile {tuple(m['tile_size'])}  hlc {tuple(m['hlc'])}"
    )
    console.print(f"compression {h['compression']}  flags 0x{h['flags']:x}  checksum 0x{h['checksum']:08x}  created_at {h['created_at']}")
    if m["custom"]:
        custom = Table("key", "value", title="custom metadata", title_justify="left")
        for k, v in m["custom"].items():
            custom.add_row(escape(printable(k)), escape(printable(v if len(v) <= 80 else v[:77] + "...")))
        console.print(custom)
    table = Table(title="chunks", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("type", no_wrap=True)
    table.add_column("chunk_id", justify="right", overflow="fold", min_width=20)
    table.add_column("name", overflow="fold")
    table.add_column("flags", justify="right")
    table.add_column("stored", justify="right")
    table.add_column("size", justify="right")
    table.add_column("crc32", no_wrap=True)
    for i, c in enumerate(info["chunks"]):
        table.add_row(
            str(i),
            f"{c['type']} {type_name(c['type'])}",
            str(c["chunk_id"]),
            escape(printable(c.get("name", ""))),
            f"0x{c['flags']:x}",
            str(c["compressed_size"]),
            str(c["uncompressed_size"]),
            f"{c['crc32']:08x}",
        )
    console.print(table)


@main.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print nothing for valid files.")
def verify_cmd(paths: tuple[str, ...], quiet: bool) -> None:
    """Check files fully; exit 1 with one line per bad file on stderr."""
    bad = 0
    for path in paths:
        try:
            _verify_one(path)
        except CheckpointError as exc:
            bad += 1
            click.echo(f"BAD {printable(_one_line(str(exc)))}", err=True)
            continue
        if not quiet:
            click.echo(f"OK  {path}")
    if bad:
        raise click.exceptions.Exit(1)


def _verify_one(path: str) -> None:
    parsed, _ = _parse(path, deep=True)
    with _about(path):
        ck = parsed.checkpoint
        regions = ck.regions()
        if not ck.is_delta:
            for name in regions:
                ck.region(name)  # declared regions exist with the declared size


@main.command("convert")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--compat", is_flag=True, help="Write what the reference reader parses (no compression, whole chunks).")
@click.option(
    "--compress", type=click.Choice(COMPRESS_CHOICES), default="auto", show_default=True, help="zstd policy (ignored with --compat)."
)
@_errors_exit
def convert_cmd(src: str, dst: str, compat: bool, compress: str) -> None:
    """Convert between .rkcp and .rk.h5 (chosen by OUT's extension)."""
    _check_out(dst)
    ckpt = _load(src)
    if compat and any(c.flags & CHUNK_BLOCK_DELTA for c in ckpt.chunks):
        raise CheckpointError(
            src, "is a block-level delta; --compat needs whole chunks: apply it to its base first (rkckpt apply BASE DELTA -o OUT --compat)"
        )
    _save(dst, ckpt, compat, compress)


@main.command("apply")
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("deltas", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Where to write the materialised state.")
@click.option("--compat", is_flag=True, help="Write what the reference reader parses.")
@click.option(
    "--compress", type=click.Choice(COMPRESS_CHOICES), default="auto", show_default=True, help="zstd policy (ignored with --compat)."
)
@_errors_exit
def apply_cmd(base: str, deltas: tuple[str, ...], out: str, compat: bool, compress: str) -> None:
    """Materialise BASE + DELTA... (a chain, oldest first) into OUT."""
    _check_out(out)
    state = _load(base)
    if any(c.flags & CHUNK_BLOCK_DELTA for c in state.chunks):
        raise CheckpointError(base, "is a block-level delta, not a full state; give the chain's full checkpoint as BASE")
    for d in deltas:
        loaded = _load(d)
        with _about(d):
            state = apply_chain(state, [loaded], sources=[d])
    _save(out, state, compat, compress)


@main.command("export")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--region", "region", help="Region name to export (dtype and shape from the checkpoint).")
@click.option("--chunk-id", "chunk_id", type=int, help="Chunk id to export as raw uint8 (for unnamed regions).")
@click.option("--chunk-type", "chunk_type", type=int, default=None, help="Chunk type, when several chunks share the id.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Output .npy file.")
@_errors_exit
def export_cmd(path: str, region: str | None, chunk_id: int | None, chunk_type: int | None, out: str) -> None:
    """Write one region (or one chunk's bytes) of PATH to a .npy file."""
    if (region is None) == (chunk_id is None):
        raise click.UsageError("give exactly one of --region NAME or --chunk-id ID")
    with _about(path):
        if hdf5.is_hdf5(path):
            hdf5.probe(path)
            if region is not None:
                arr = hdf5.read_region(path, region)
            else:
                arr = np.frombuffer(hdf5.read_chunk(path, chunk_id, chunk_type), dtype=np.uint8)  # type: ignore[arg-type]
        else:
            arr = _export_from(path, _load(path), region, chunk_id, chunk_type)
    with _about(out):
        _atomic_write(Path(out), lambda fh: np.save(fh, arr, allow_pickle=False))


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
