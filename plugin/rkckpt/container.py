"""The RKCKPT container, the public facade: read and write a checkpoint in any form.

* ``read(target)``: a path (``.rkcp``, sharded ``.rkcp`` or ``.rk.h5``, told
  apart by content, see ``rkckpt.forms``), bytes in memory, or any
  ``source.Source``; returns a ``ParsedFile`` (the checkpoint plus the header
  and chunk headers). ``load(target)`` is ``read(target).checkpoint``.
* ``scan(source)``: header, metadata and chunk table without payloads.
* ``write(target, ckpt, options)``: a path (atomic; ``.rk.h5`` by suffix) or
  any binary file object (streaming; seekable or not). ``encode(ckpt)`` is
  the in-memory form.

The stream itself (reader and streaming writer) is ``rkckpt.stream``; the
forms a path may hold are ``rkckpt.forms``.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from . import forms
from .codec import WriteOptions
from .forms import H5_SUFFIXES, HDF5_SIGNATURE  # noqa: F401 - re-exported
from .model import Checkpoint
from .source import Buffer, MemorySource, Source
from .stream import (  # noqa: F401 - re-exported: the facade keeps every name it had
    MAX_DECODED,
    Encoding,
    ParsedFile,
    Scan,
    Written,
    check,
    elem_sizes,
    emit,
    encode,
    encode_single,
    encode_stream,
    read_source,
    scan,
    streams,
    write_fully,
    write_to,
)

__all__ = ["ParsedFile", "Scan", "check", "encode", "load", "read", "scan", "write"]


def read(target: str | os.PathLike[str] | Buffer | Source, source: str | os.PathLike[str] | None = None) -> ParsedFile:
    """Parse a checkpoint from a path (``.rkcp``, sharded or ``.rk.h5``, by content), bytes, or a source."""
    if isinstance(target, bytes | bytearray | memoryview):
        return read_source(MemorySource(target, None if source is None else os.fspath(source)), allow_shards=False)
    if not isinstance(target, str | os.PathLike):
        return read_source(target)
    return forms.read(target)


def load(target: str | os.PathLike[str] | Buffer | Source) -> Checkpoint:
    """The checkpoint stored at ``target`` (see ``read``)."""
    return read(target).checkpoint


def write(
    target: str | os.PathLike[str] | BinaryIO,
    ckpt: Checkpoint,
    options: WriteOptions = WriteOptions(),  # noqa: B008 - frozen
    *,
    chain_base: str | None = None,
) -> int:
    """Write ``ckpt``; return the bytes written.

    A path is written atomically (temp file in the same folder, fsync,
    rename, fsync folder), as ``.rk.h5`` when its name ends so; a file
    object is streamed to (states over 1 GiB become shards).
    """
    if not isinstance(target, str | os.PathLike):
        return write_to(target, ckpt, options)
    return forms.write(target, ckpt, options, chain_base=chain_base)
