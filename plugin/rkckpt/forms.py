"""The file forms of a checkpoint, in one table (in the manner of h5py's driver registry).

A checkpoint file is one of two forms:

* ``rkcp``: the bare RKCKPT stream (``rkckpt.stream``), possibly sharded;
* ``rk.h5``: the same stream, byte-exact, inside an HDF5 wrapper
  (``rkckpt.hdf5``: ``h5write``, ``h5read``), with an index and attributes for HDF5 readers.

Every "which form is this" question is answered here, and only here:

* by content (``sniff``): a file that starts with the HDF5 signature is
  ``rk.h5`` whatever its name; a file named like HDF5 without the signature
  is refused, not parsed as a bare stream;
* by name (``for_path``): what a new file is written as (``.rk.h5``, ``.h5``
  and ``.hdf5`` are HDF5, anything else the bare stream);
* by chain format (``by_format``): ``rk.h5`` or ``rkcp``, the
  ``checkpoint_format`` of a chain and the suffix of its file names
  (``for_chain_name`` is the reverse).

This module sits above the stream and the HDF5 wrapper and below
``container`` (the public facade), ``chain``, ``manager`` and the CLI, so
nothing imports in a circle.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import h5layout, h5read, h5write, stream
from .atomic import atomic_open
from .codec import WriteOptions
from .errors import CheckpointError
from .model import Checkpoint
from .source import FileSource, Source, StorageSource

__all__ = ["FORMS", "H5", "RKCP", "Form", "by_format", "for_chain_name", "for_path", "read", "sniff", "sniff_path", "write"]

#: file names that are written (and must read) as HDF5
H5_SUFFIXES = (".rk.h5", ".h5", ".hdf5")
HDF5_SIGNATURE = h5layout.SIGNATURE


@dataclass(frozen=True)
class Form:
    """One file form: how it is recognised, read and written."""

    name: str  # the chain's checkpoint_format
    suffix: str  # the suffix of the chain's file names in this form
    sniff: Callable[[Source], bool]  # does this source hold this form (by content)
    read: Callable[[str, Source], stream.ParsedFile]  # (path, the path opened) -> parsed checkpoint
    write: Callable[[Path, Checkpoint, WriteOptions, str | None], int]  # atomic write of a path; bytes written
    write_to: Callable[[BinaryIO, Checkpoint, WriteOptions, str | None], int]  # stream into a new file object
    # (path or object name, storage or None, follow_links=) -> the RKCKPT stream
    open_stream: Callable[..., Source]
    # (path or object name, region, storage or None, follow_links=): a region by range reads, when the form indexes them
    read_region: Callable[..., np.ndarray] | None
    shards: bool  # may the stream be sharded


def _rkcp_write(path: Path, ckpt: Checkpoint, options: WriteOptions, chain_base: str | None) -> int:
    with atomic_open(path) as f:
        return stream.write_to(f, ckpt, options)


def _rkcp_open_stream(name: str, storage: Any, *, follow_links: bool = True) -> Source:
    return FileSource(name, follow_links=follow_links) if storage is None else StorageSource(storage, name)


RKCP = Form(
    name="rkcp",
    suffix=".rkcp",
    sniff=lambda source: True,  # the bare stream is what is not HDF5; its parser checks the rest
    read=lambda path, opened: stream.read_source(opened),
    write=_rkcp_write,
    write_to=lambda f, ckpt, options, chain_base: stream.write_to(f, ckpt, options),
    open_stream=_rkcp_open_stream,
    read_region=None,
    shards=True,
)

H5 = Form(
    name="rk.h5",
    suffix=".rk.h5",
    sniff=h5layout.has_signature,
    read=lambda path, opened: h5read.read(path),
    write=lambda path, ckpt, options, chain_base: h5write.write_h5(path, ckpt, options, chain_base=chain_base),
    write_to=lambda f, ckpt, options, chain_base: h5write.write_to(f, ckpt, options, chain_base=chain_base),
    open_stream=h5read.open_stream,
    read_region=h5read.read_region,
    shards=False,
)

#: the forms by chain format name; sniffing tries them in this order (the bare stream last)
FORMS: dict[str, Form] = {H5.name: H5, RKCP.name: RKCP}


def by_format(fmt: str) -> Form:
    """The form a chain's ``checkpoint_format`` names."""
    try:
        return FORMS[fmt]
    except KeyError:
        raise ValueError(f"checkpoint format must be one of {sorted(FORMS)}, not {fmt!r}") from None


def for_chain_name(name: str) -> Form:
    """The form of a chain file, by the suffix its name ends with."""
    return H5 if name.endswith(H5.suffix) else RKCP


def for_path(path: str | os.PathLike[str]) -> Form:
    """The form a file is written in, by its name."""
    return H5 if os.fspath(path).lower().endswith(H5_SUFFIXES) else RKCP


def sniff(source: Source) -> Form:
    """The form ``source`` holds, by content."""
    return next(form for form in FORMS.values() if form.sniff(source))


def sniff_path(path: str | os.PathLike[str]) -> Form | None:
    """The form of the file at ``path`` by content; None when it cannot be opened as a regular file."""
    try:
        with FileSource(path) as f:  # a FIFO or device is refused, never waited on
            return sniff(f)
    except CheckpointError:
        return None


def read(path: str | os.PathLike[str]) -> stream.ParsedFile:
    """Parse the checkpoint file at ``path``, in the form its content shows."""
    path = os.fspath(path)
    with FileSource(path) as fs:
        form = sniff(fs)
        if form is not H5 and for_path(path) is H5:
            raise CheckpointError(path, "not an HDF5 file (no HDF5 signature)")
        return form.read(path, fs)


def write(path: str | os.PathLike[str], ckpt: Checkpoint, options: WriteOptions, *, chain_base: str | None = None) -> int:
    """Write ``ckpt`` atomically to ``path`` in the form its name asks for; return the bytes written."""
    path = Path(path)
    return for_path(path).write(path, ckpt, options, chain_base)
