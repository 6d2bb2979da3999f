"""``.rk.h5``: an RKCKPT stream wrapped in HDF5, with an index for partial reads.

Layout (wrapper version 1):

- ``/rkckpt``: the RKCKPT v1 stream, byte-exact, one contiguous uint8
  dataset, so ``h5py`` or ``h5dump -d /rkckpt -b`` extract a file the
  reference reader parses. This writer puts it last in the file, starting
  on a 4 KiB page, after all the HDF5 structure below.
- root attributes: ``rkckpt.wrapper`` (= "rkckpt.h5"), ``wrapper_version``,
  ``format_version``, ``kernel_id``, ``kernel_type``, ``step``, ``kind``
  ("full"/"delta"), ``content_digest``, ``parent_digest`` ("" for a full
  checkpoint), ``chain_base`` (digest of the full checkpoint a chain starts
  from; "" when the writer did not know it), ``created_at``.
- ``/index``: one row per chunk (type, id, name, offset of the stored payload
  inside ``/rkckpt``, stored size, uncompressed size, stored flags, CRC-32 of
  the uncompressed data), so one region is read without reading the rest.
- ``/regions``: name, dtype, shape and chunk id of each named region.

The index and attributes are a convenience for readers; the stream stays
the source of truth, and ``check_h5`` verifies that they agree with it.
Readers take the stream's bytes from the file at the dataset's offset (one
byte-range source, the same reader as ``.rkcp``), after checking that the
dataset is a plain one stored in this file.

This module is the facade over the modules that do the work, one concept
each: ``h5schema`` (names, tables, limits), ``h5write`` (the writer),
``h5read`` (the reader, region and chunk reads, ``check_h5``), ``h5probe``
(the forked libhdf5 probe) and ``h5layout`` (the pure-Python layout parser).
"""

from __future__ import annotations

from . import h5layout, h5probe, h5read
from .h5probe import DEFAULT_PROBE_TIMEOUT, ProbeAbandoned, abandon_probes_when, probe_timeout
from .h5read import (
    MAX_STRUCTURE,
    _Opened,
    attributes,
    check_h5,
    open_stream,
    probe,
    read,
    read_chunk,
    read_index,
    read_region,
    read_stream,
)
from .h5schema import CHAIN_BASE_KEY, INDEX, MAX_REGIONS, PAGE, REGIONS, STREAM, WRAPPER, WRAPPER_VERSION, IndexEntry
from .h5write import MAX_COMPACT_ATTRS, STREAM_ALIGN_ABOVE, write_h5, write_to
from .source import FileSource

_PROBED = h5probe._PROBED  # the verdict cache itself (tests clear it)

__all__ = [
    "CHAIN_BASE_KEY",
    "DEFAULT_PROBE_TIMEOUT",
    "INDEX",
    "MAX_COMPACT_ATTRS",
    "MAX_REGIONS",
    "MAX_STRUCTURE",
    "PAGE",
    "REGIONS",
    "STREAM",
    "STREAM_ALIGN_ABOVE",
    "WRAPPER",
    "WRAPPER_VERSION",
    "FileSource",
    "IndexEntry",
    "ProbeAbandoned",
    "_Opened",
    "abandon_probes_when",
    "attributes",
    "check_h5",
    "h5layout",
    "open_stream",
    "probe",
    "probe_timeout",
    "read",
    "read_chunk",
    "read_index",
    "read_region",
    "read_stream",
    "write_h5",
    "write_to",
]


def _probe_child(src: str, timeout: float) -> str | None:
    """The probe's child over ``src`` with the reader's structure reads; the problem found, or None (tests, bench)."""
    return h5probe._probe_child(src, timeout, h5read._read_structure)
