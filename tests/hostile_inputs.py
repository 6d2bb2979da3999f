"""Every hostile input the tests throw at the readers, built in one place (not a fixture module).

The hostile-input tests (test_hostile, test_cli_hostile, test_folder_safety,
test_malformed, test_h5_hostile, test_fuzz) each used to build their own FIFOs,
symlinks, flipped bytes and crafted streams; a new reader had to be pointed at
five files to meet them all. Here are:

- ``plant(kind, path)``: one hostile thing under a checkpoint's name, for every
  kind in ``KINDS`` (FIFO, symlink out of the folder, huge sparse file, nested
  folder, truncated or bit-flipped checkpoint, a copy owned by another user);
- byte-level damage (``flip_byte``, ``flip_bytes``, ``mutate``);
- crafted streams and wrappers a writer would never make (``raw_stream``,
  ``rle_frame``, ``frames_payload``, ``wrapping_patch``, the ``h5_*`` wrappers
  whose stream lives in another file).
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asuser import NOBODY
from rkckpt import CheckpointError, layout
from rkckpt.delta import PATCH_MAGIC
from rkckpt.flags import CHUNK_ZSTD, COMPRESSION_ZSTD
from rkckpt.h5schema import WRAPPER
from rkckpt.model import Metadata

PathLike = str | os.PathLike[str]

#: What a symlink planted in a checkpoint folder points at: it must never be read as, or replaced by, a checkpoint.
VICTIM = b"precious data\n" * 236  # 3,304 bytes
#: A sparse file's apparent size: far past any limit, a few KiB on disk.
SPARSE_SIZE = 1 << 40


# ------------------------------------------------------------------ byte-level damage
def flip_byte(target: PathLike | bytearray, offset: int = -10, mask: int = 0xFF) -> None:
    """XOR one byte (negative ``offset``: from the end) of a file or buffer: same size, perfect header, bad checksum."""
    if isinstance(target, bytearray):
        target[offset] ^= mask
        return
    with open(target, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ mask]))


def flip_stream_payload(p: PathLike) -> None:
    """Flip a bit in the last chunk's data of the RKCKPT stream inside a ``.rk.h5`` (not in HDF5 padding): perfect
    headers, so only a check that reads the payload (CRCs, digests) finds it."""
    b = bytearray(Path(p).read_bytes())
    at = b.find(b"10TPKCKR")
    assert at >= 0, f"{p}: no RKCKPT stream"
    total = int.from_bytes(b[at + 16 : at + 24], "little")
    b[at + total - 10] ^= 0x10
    Path(p).write_bytes(bytes(b))


def flip_bytes(raw: bytes, flips: list[tuple[int, int]]) -> bytes:
    """``raw`` with each ``(offset, mask)`` XORed in."""
    buf = bytearray(raw)
    for at, mask in flips:
        buf[at] ^= mask
    return bytes(buf)


def truncate_to(path: PathLike, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def mutate(raw: bytes, rng: random.Random, structure: int = 8192) -> bytes:
    """Truncate, flip bytes or zero a range, mostly in the first ``structure`` bytes (an HDF5 file's structure)."""
    buf = bytearray(raw)
    structure = min(len(buf), structure)
    kind = rng.choice(("truncate", "flip", "zero", "zero-structure"))
    if kind == "truncate":
        del buf[rng.randrange(len(buf)) :]
    elif kind == "flip":
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(structure if rng.random() < 0.8 else len(buf))
            buf[at] ^= 1 << rng.randrange(8)
    else:
        span = rng.choice((8, 29, 64, 300))
        top = structure if kind == "zero-structure" else len(buf)
        at = rng.randrange(max(1, top - span))
        buf[at : at + span] = bytes(len(buf[at : at + span]))
    return bytes(buf)


@dataclass
class Outcome:
    """One reader on one hostile file: it read (``value``), refused it properly, or did something else (``bug``)."""

    value: Any = None
    refused: bool = False
    bug: str | None = None

    @property
    def read(self) -> bool:
        return not self.refused and self.bug is None


def try_reader(read: Callable[[str], Any], path: str) -> Outcome:
    """Run ``read(path)`` on the hostile file ``path``: only a CheckpointError naming ``path`` is a proper refusal."""
    try:
        return Outcome(value=read(path))
    except CheckpointError as exc:
        if exc.source != path:
            return Outcome(bug=f"error does not name the file: {exc}")
        return Outcome(refused=True)
    except BaseException as exc:  # noqa: BLE001 - anything else is a bug
        return Outcome(bug=f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ hostile things under a checkpoint's name
def give_to_nobody(path: PathLike, mode: int | None = None) -> None:
    """Make ``path`` (and, for a folder, what is directly in it) owned by uid/gid 65534 (tests/asuser.py)."""
    os.chown(path, NOBODY, NOBODY)
    if os.path.isdir(path):
        for name in os.listdir(path):
            os.chown(os.path.join(path, name), NOBODY, NOBODY)
    if mode is not None:
        os.chmod(path, mode)


def symlink_out(link: PathLike, victim: PathLike | None = None) -> Path:
    """A symlink at ``link`` to a file outside its folder holding ``VICTIM``; return the victim's path."""
    link = Path(link)
    target = Path(victim) if victim is not None else link.parent.parent / f"victim-of-{link.name}"
    if not target.exists():
        target.write_bytes(VICTIM)
    os.symlink(target, link)
    return target


def _fifo(path: Path, donor: Path | None) -> None:
    os.mkfifo(path)  # a reader that open()s it without a writer blocks for ever


def _symlink(path: Path, donor: Path | None) -> None:
    symlink_out(path)  # to VICTIM outside the folder: a reader must not take it, a writer must not replace it


def _sparse(path: Path, donor: Path | None) -> None:
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)  # a reader that trusts the size allocates a TiB


def _nested(path: Path, donor: Path | None) -> None:
    path.mkdir()
    (path / "inner.rkcp").write_bytes(b"not a checkpoint")


def _truncated(path: Path, donor: Path | None) -> None:
    assert donor is not None, "a truncated checkpoint needs a donor file"
    data = donor.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flipped(path: Path, donor: Path | None) -> None:
    assert donor is not None, "a bit-flipped checkpoint needs a donor file"
    shutil.copyfile(donor, path)
    flip_byte(path, -10)


def _foreign(path: Path, donor: Path | None) -> None:
    if donor is not None:
        shutil.copyfile(donor, path)
    else:
        path.write_bytes(VICTIM)
    give_to_nobody(path, 0o600)


#: kind -> builder(path, donor): a hostile object at ``path``; ``donor`` is a valid checkpoint to damage or copy.
KINDS: dict[str, Callable[[Path, Path | None], None]] = {
    "fifo": _fifo,
    "symlink": _symlink,
    "sparse": _sparse,
    "nested-folder": _nested,
    "truncated": _truncated,
    "bit-flipped": _flipped,
    "foreign-owner": _foreign,
}


def plant(kind: str, path: PathLike, donor: PathLike | None = None) -> Path:
    """Put a hostile object of ``kind`` (a key of ``KINDS``) at ``path``; return ``path``."""
    path = Path(path)
    KINDS[kind](path, Path(donor) if donor is not None else None)
    return path


# ------------------------------------------------------------------ crafted streams
def raw_stream(chunks: list[tuple[int, int, int, int, bytes]], *, compression: int = 0, meta: Metadata | None = None) -> bytes:
    """A stream of (type, id, stored flags, uncompressed size, payload) chunks, checksum right."""
    body = layout.pack_metadata(meta or Metadata("hostile", "t", 1))
    body += b"".join(layout.pack_chunk(t, f, u, len(p), i) + p for t, i, f, u, p in chunks)
    return layout.pack_header(layout.HEADER_SIZE + len(body), len(chunks), compression, zlib.crc32(body), 0, 0) + body


def rle_frame(total: int, *, declared: int | None = None, block: int = 1 << 17) -> bytes:
    """A zstd frame of RLE blocks expanding to ``total`` bytes.

    Tiny on disk, huge when decompressed: a reader that trusts it would
    allocate ``total`` bytes. ``declared`` writes a (lying) content size.
    """
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    if declared is None:
        out += bytes([0x00, 7 << 3])  # no content size, no checksum; window 2**17
    else:
        out += bytes([0x80, 7 << 3]) + struct.pack("<I", declared)  # 4-byte content size
    left = total
    while left > 0:
        n = min(block, left)
        left -= n
        out += ((n << 3) | (1 << 1) | (1 if left == 0 else 0)).to_bytes(3, "little") + b"\x00"
    return bytes(out)


def frames_payload(frames: list[bytes], *, block_size: int, raw: tuple[int, ...] = (), count: int | None = None) -> bytes:
    """The codec's compressed-chunk layout: block size, frame count, frame sizes, frames."""
    n = len(frames) if count is None else count
    sizes = [len(f) | (1 << 31 if i in raw else 0) for i, f in enumerate(frames)]
    return struct.pack("<II", block_size, n) + struct.pack(f"<{len(sizes)}I", *sizes) + b"".join(frames)


def zstd_chunk_stream(payload: bytes, uncompressed_size: int, flags: int = CHUNK_ZSTD) -> bytes:
    """A valid stream (``sample_checkpoint``'s) whose custom chunk, the last one, stores ``payload`` with ``flags``."""
    from ckpt_helpers import fix_total, sample_checkpoint
    from rkckpt import codec, container

    raw = bytearray(container.encode(sample_checkpoint(), codec.COMPAT))
    last = container.read(bytes(raw)).chunk_headers[-1].data_offset - 32
    ctype, _, _, _, cid = struct.unpack_from("<IIQQQ", raw, last)
    out = raw[:last] + struct.pack("<IIQQQ", ctype, flags, uncompressed_size, len(payload), cid) + payload
    struct.pack_into("<I", out, 28, COMPRESSION_ZSTD)
    struct.pack_into("<I", out, 36, 1)  # HDR_EXTENDED
    return bytes(fix_total(out))


def wrapping_patch(parent_size: int) -> bytes:
    """A block-delta patch whose one run ends at 2**63: it wraps to a negative int64."""
    start = count = 1 << 62
    header = struct.pack("<4sIQQII", PATCH_MAGIC, 4096, parent_size, parent_size, 1, 0)
    return header + struct.pack("<QQ", start, count) + bytes(4096)


# ------------------------------------------------------------------ .rk.h5 wrappers whose stream is elsewhere
def wrapper_attrs(f: object) -> None:
    """The root attributes that make an HDF5 file claim to be an .rk.h5 wrapper."""
    f.attrs["rkckpt.wrapper"] = WRAPPER  # type: ignore[attr-defined]
    f.attrs["wrapper_version"] = 1  # type: ignore[attr-defined]


def h5_external_storage(path: PathLike, secret: PathLike, n: int) -> None:
    """``/rkckpt`` stored in another file (HDF5 external storage)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("rkckpt", shape=(n,), dtype="u1", external=[(os.fspath(secret), 0, n)])
        wrapper_attrs(f)


def h5_external_link(path: PathLike, other_h5: PathLike) -> None:
    """``/rkckpt`` an ExternalLink to another file's stream."""
    import h5py

    with h5py.File(path, "w") as f:
        f["rkckpt"] = h5py.ExternalLink(os.fspath(other_h5), "/rkckpt")
        wrapper_attrs(f)


def h5_virtual(path: PathLike, other_h5: PathLike, n: int) -> None:
    """``/rkckpt`` a virtual dataset mapping another file's stream."""
    import h5py

    vl = h5py.VirtualLayout(shape=(n,), dtype="u1")
    vl[:] = h5py.VirtualSource(os.fspath(other_h5), "rkckpt", shape=(n,))
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("rkckpt", vl)
        wrapper_attrs(f)
