"""Plumbing shared by the ``rkckpt`` subcommands: errors as one line, reading, writing, locations.

Every failure ends as one line ``rkckpt: error: FILE: problem`` on stderr and
exit status 1 (2 for usage errors, from click); ``errors_exit`` is the one
place that turns typed errors into that. No traceback reaches the user unless
``RKCKPT_DEBUG=1`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click

from .. import codec, container, forms, h5read
from ..container import ParsedFile
from ..display import printable
from ..errors import CheckpointError
from ..flags import CHUNK_BLOCK_DELTA
from ..model import Checkpoint
from ..storage import FileStorage, Storage, open_storage

F = TypeVar("F", bound=Callable[..., Any])
COMPRESS_CHOICES = ("auto", "always", "never")


@contextlib.contextmanager
def about(path: str | os.PathLike[str]) -> Iterator[None]:
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


def one_line(message: str) -> str:
    return " ".join(message.split("\n"))


#: Exit statuses of every subcommand (click's own usage errors exit 2).
EXIT_ERROR = 1
EXIT_NOTHING = 3  # ``latest``: nothing restorable


def fail(message: str) -> NoReturn:
    """End the command: ``message`` as one line on stderr, exit status 1."""
    click.echo(f"rkckpt: error: {printable(one_line(message))}", err=True)
    raise click.exceptions.Exit(EXIT_ERROR)


def errors_exit(fn: F) -> F:
    """The one place a typed error becomes the command's exit: one line on stderr, status 1.

    A CheckpointError (storage errors included) already names its file; an
    OSError is named by its file or, failing that, the command's LOCATION.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CheckpointError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{exc.filename or kwargs.get('location', '')}: {exc.strerror or exc}")

    return wrapper  # type: ignore[return-value]


def parse(path: str, *, deep: bool = False) -> tuple[ParsedFile, dict[int, str]]:
    """Parse ``path`` (.rkcp or .rk.h5, by content); also return the HDF5 index's region names."""
    with about(path):
        if forms.sniff_path(path) is forms.H5:
            h5read.probe(path)  # a damaged HDF5 structure can crash libhdf5: try it in a child first
            parsed = h5read.check_h5(path) if deep else container.read(path)
            names = {e.chunk_id: e.name for e in h5read.read_index(path) if e.name}
            return parsed, names
        return container.read(path), {}


def load(path: str) -> Checkpoint:
    return parse(path)[0].checkpoint


def options(compat: bool, compress: str = "auto") -> codec.WriteOptions:
    """``auto``: the codec's default (compress only when that is not slower than
    the disk); ``always``: whenever it makes the file smaller; ``never``: raw."""
    if compat:
        return codec.COMPAT
    extra: dict[str, Any] = {"auto": {}, "always": {"adaptive": "size"}, "never": {"compress": False}}[compress]
    return codec.WriteOptions(**extra)


def check_out(path: str) -> None:
    if not (forms.for_path(path) is forms.H5 or path.endswith(forms.RKCP.suffix)):
        raise click.BadParameter(f"{path}: output must end in .rkcp or .rk.h5", param_hint="OUT")


def refuse_compat_delta(path: str, ckpt: Checkpoint, compat: bool) -> None:
    if compat and any(c.flags & CHUNK_BLOCK_DELTA for c in ckpt.chunks):
        raise CheckpointError(
            path,
            "is a block-level delta; --compat needs whole chunks: apply it to its base first (rkckpt apply BASE DELTA -o OUT --compat)",
        )


def save(path: str, ckpt: Checkpoint, compat: bool, compress: str = "auto") -> int:
    """Write ``ckpt`` atomically as .rkcp (streaming, shards over 1 GiB) or .rk.h5, by suffix."""
    with about(path):
        refuse_compat_delta(path, ckpt, compat)
        check_out(path)
        return container.write(path, ckpt, options(compat, compress))


def open_location(location: str, *, must_exist: bool = True) -> Storage:
    """A checkpoint folder or storage URL, read-only (no staging, no folder created)."""
    if "://" not in location or location.startswith("file://"):
        path = location.removeprefix("file://")
        if must_exist and not os.path.isdir(path):
            raise CheckpointError(path, "not a folder" if os.path.exists(path) else "no such checkpoint folder")
        return FileStorage(path, create=False)
    return open_storage(location, local=False)


def where(storage: Storage, name: str) -> str:
    return f"{storage.url.rstrip('/')}/{name}"
