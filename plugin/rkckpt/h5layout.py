"""Locate the RKCKPT stream in an ``.rk.h5`` file without libhdf5: a bounded pure-Python parser.

Why: libhdf5 can spin forever or crash on damaged metadata (a few zeroed
bytes are enough), no ``except`` catches that, and importing h5py alone
costs 20-30 ms on every cold load. rkckpt's own writer lays every ``.rk.h5``
out the same way (see ``hdf5.write_to``): superblock version 2 or 3, a root
group object header (version 2) with compact links and compact attributes,
and ``/rkckpt`` a contiguous, unfiltered 1-D uint8 dataset. This module reads
exactly those structures and nothing else: each offset and size is checked
against the bytes present before it is used, the number of header chunks,
messages and bytes read is capped, and there is no recursion. So it always
ends, quickly, with either

- a ``Located`` (stream offset and length, checked to lie inside the file),
- ``NotFixedLayout``: the file is not laid out the way rkckpt writes it
  (another tool wrote or rewrote it, or the metadata is damaged); the caller
  then lets libhdf5 decide, in a forked child with a timeout first, or
- ``CheckpointError``: a definite refusal (truncated file, a ``/rkckpt``
  that claims more bytes than the file holds).

The HDF5 metadata checksums are not verified here: the stream carries its
own checksum, which every reader verifies, so a damaged byte in HDF5
metadata that this parser does not use cannot change what is read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import CheckpointError
from .source import Source

SIGNATURE = b"\x89HDF\r\n\x1a\n"
UNDEFINED = (1 << 64) - 1
MAX_METADATA_BYTES = 1 << 20  # the writer's structure is a few KiB
MAX_HEADER_CHUNKS = 16
MAX_MESSAGES = 1024
PAGE = 4096

# object header message types (HDF5 file format specification, IV.A.2)
_MSG_NIL, _MSG_DATASPACE, _MSG_DATATYPE = 0x00, 0x01, 0x03
_MSG_EXTERNAL, _MSG_LAYOUT, _MSG_FILTERS = 0x07, 0x08, 0x0B
_MSG_ATTRIBUTE, _MSG_CONTINUATION, _MSG_ATTR_INFO = 0x0C, 0x10, 0x15
_MSG_LINK = 0x06


def has_signature(source: Source) -> bool:
    """True when ``source`` starts with the HDF5 signature (no user block): the one sniff of the form."""
    return source.size >= len(SIGNATURE) and bytes(source.read(0, len(SIGNATURE))) == SIGNATURE


class NotFixedLayout(Exception):
    """The file is not laid out the way rkckpt's writer lays out ``.rk.h5`` (a reason, not a verdict)."""


@dataclass(frozen=True)
class Located:
    """Where the stream lies, and what the wrapper attributes say."""

    offset: int
    length: int
    wrapper: str
    wrapper_version: int
    eof: int


class _Bytes:
    """Bounded, page-cached reads of the file's metadata."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.size = int(source.size)
        self.pages: dict[int, bytes] = {}
        self.budget = MAX_METADATA_BYTES

    def get(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise NotFixedLayout(f"structure at {offset}+{n} lies outside the {self.size}-byte file")
        out = bytearray()
        at = offset
        while at < offset + n:
            page = at // PAGE
            data = self.pages.get(page)
            if data is None:
                if self.budget <= 0:
                    raise NotFixedLayout(f"HDF5 structure needs more than {MAX_METADATA_BYTES} bytes of metadata")
                start = page * PAGE
                data = bytes(self.source.read(start, min(PAGE, self.size - start)))
                self.budget -= len(data)
                self.pages[page] = data
            lo = at - page * PAGE
            take = min(len(data) - lo, offset + n - at)
            out += data[lo : lo + take]
            at += take
        return bytes(out)


def _u(b: bytes, at: int, size: int) -> int:
    if at < 0 or at + size > len(b):
        raise NotFixedLayout("message field past the end of its message")
    return int.from_bytes(b[at : at + size], "little")


def _messages(rd: _Bytes, address: int) -> list[tuple[int, bytes]]:
    """Messages of a version-2 object header (its chunk 0 and continuation chunks), bounded."""
    return [(t, d) for t, d, _ in _walk(rd, address)[0]]


def _walk(rd: _Bytes, address: int) -> tuple[list[tuple[int, bytes, int]], list[tuple[int, int]]]:
    """(messages as (type, data, file offset of the data), checksummed spans [start, end) of its chunks)."""
    head = rd.get(address, 6)
    if head[:4] != b"OHDR" or head[4] != 2:
        raise NotFixedLayout(f"object header at {address} is not a version-2 header")
    flags = head[5]
    at = address + 6
    if flags & 0x20:
        at += 16  # access, modification, change, birth times
    if flags & 0x10:
        at += 4  # attribute phase change values
    width = 1 << (flags & 0x03)
    size = int.from_bytes(rd.get(at, width), "little")
    at += width
    chunks = [(at, size)]
    spans = [(address, at + size)]  # the checksum follows each chunk
    out: list[tuple[int, bytes, int]] = []
    done = 0
    while done < len(chunks):
        start, length = chunks[done]
        done += 1
        if done > MAX_HEADER_CHUNKS:
            raise NotFixedLayout("object header has too many continuation chunks")
        body = rd.get(start, length)
        pos = 0
        header = 6 if flags & 0x04 else 4  # creation order tracked: 2 more bytes per message
        while pos + header <= len(body):
            mtype, msize, mflags = body[pos], _u(body, pos + 1, 2), body[pos + 3]
            pos += header
            if pos + msize > len(body):
                raise NotFixedLayout("object header message runs past its chunk")
            data = body[pos : pos + msize]
            where = start + pos
            pos += msize
            if mflags & 0x02:
                raise NotFixedLayout("shared object header message")
            if mtype == _MSG_CONTINUATION:
                off, ln = _u(data, 0, 8), _u(data, 8, 8)
                if ln < 8:
                    raise NotFixedLayout("continuation chunk too small")
                sig = rd.get(off, 4)
                if sig != b"OCHK":
                    raise NotFixedLayout(f"continuation chunk at {off} has no OCHK signature")
                chunks.append((off + 4, ln - 8))  # signature before, checksum after
                spans.append((off, off + ln - 4))
            elif mtype != _MSG_NIL:
                out.append((mtype, data, where))
            if len(out) > MAX_MESSAGES:
                raise NotFixedLayout("object header has too many messages")
    return out, spans


#: lookup3's ``mix`` as (x, y, z, r): x -= z; x ^= rot(z, r); z += y, over the state (a, b, c) = 0, 1, 2
_MIX = ((0, 1, 2, 4), (1, 2, 0, 6), (2, 0, 1, 8), (0, 1, 2, 16), (1, 2, 0, 19), (2, 0, 1, 4))
#: lookup3's ``final`` as (x, y, r): x ^= y; x -= rot(y, r)
_FINAL = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))
_M32 = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def lookup3_reference(data: bytes | bytearray | memoryview, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, step for step as the reference's ``mix`` and ``final`` macros (the tables above).

    Kept as the readable specification that ``lookup3`` (unrolled, memoised)
    is tested against; nothing on a hot path calls it.
    """
    length = len(data)
    v = [(0xDEADBEEF + length + initval) & _M32] * 3
    k = bytes(data)
    i = 0
    while length > 12:
        for j in range(3):
            v[j] = (v[j] + int.from_bytes(k[i + 4 * j : i + 4 * j + 4], "little")) & _M32
        for x, y, z, r in _MIX:
            v[x] = ((v[x] - v[z]) & _M32) ^ _rot(v[z], r)
            v[z] = (v[z] + v[y]) & _M32
        length -= 12
        i += 12
    if length == 0:
        return v[2]
    tail = k[i : i + length] + bytes(12 - length)
    for j in range(3):
        v[j] = (v[j] + int.from_bytes(tail[4 * j : 4 * j + 4], "little")) & _M32
    for x, y, r in _FINAL:
        v[x] = ((v[x] ^ v[y]) - _rot(v[y], r)) & _M32
    return v[2]


#: checksums of metadata blocks seen before, by their bytes: most blocks of a ``.rk.h5`` wrapper
#: (superblock, the stream's object header) are the same from one checkpoint of a kernel to the next
_MEMO: dict[bytes, int] = {}
_MEMO_MAX = 256


def lookup3(data: bytes | bytearray | memoryview, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, as HDF5 checksums its metadata (``H5_checksum_lookup3``).

    Written here because no maintained Python package provides lookup3 (and
    h5py does not expose HDF5's). The writer recomputes the checksums of a
    few blocks (about 1.2 KiB) for every checkpoint, so this is the
    reference (``lookup3_reference``) unrolled: all words unpacked at once,
    the state in locals, which costs a sixth of the loop over the tables;
    and a block seen before is answered from a small memo by its bytes.
    """
    key = bytes(data)
    if initval == 0:
        hit = _MEMO.get(key)
        if hit is not None:
            return hit
    out = _hashlittle(key, initval)
    if initval == 0:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = out
    return out


def _hashlittle(k: bytes, initval: int) -> int:
    """``lookup3_reference`` with ``mix`` and ``final`` written out over locals (the same arithmetic)."""
    length = len(k)
    a = b = c = (0xDEADBEEF + length + initval) & _M32
    if length == 0:
        return c
    blocks = (length - 1) // 12  # the last 1..12 bytes go through ``final``
    padded = k + bytes(12 * (blocks + 1) - length)
    w = struct.unpack(f"<{3 * (blocks + 1)}I", padded)
    m = _M32
    for i in range(0, 3 * blocks, 3):
        a = (a + w[i]) & m
        b = (b + w[i + 1]) & m
        c = (c + w[i + 2]) & m
        a = ((a - c) & m) ^ (((c << 4) | (c >> 28)) & m)
        c = (c + b) & m
        b = ((b - a) & m) ^ (((a << 6) | (a >> 26)) & m)
        a = (a + c) & m
        c = ((c - b) & m) ^ (((b << 8) | (b >> 24)) & m)
        b = (b + a) & m
        a = ((a - c) & m) ^ (((c << 16) | (c >> 16)) & m)
        c = (c + b) & m
        b = ((b - a) & m) ^ (((a << 19) | (a >> 13)) & m)
        a = (a + c) & m
        c = ((c - b) & m) ^ (((b << 4) | (b >> 28)) & m)
        b = (b + a) & m
    i = 3 * blocks
    a = (a + w[i]) & m
    b = (b + w[i + 1]) & m
    c = (c + w[i + 2]) & m
    c = ((c ^ b) - (((b << 14) | (b >> 18)) & m)) & m
    a = ((a ^ c) - (((c << 11) | (c >> 21)) & m)) & m
    b = ((b ^ a) - (((a << 25) | (a >> 7)) & m)) & m
    c = ((c ^ b) - (((b << 16) | (b >> 16)) & m)) & m
    a = ((a ^ c) - (((c << 4) | (c >> 28)) & m)) & m
    b = ((b ^ a) - (((a << 14) | (a >> 18)) & m)) & m
    c = ((c ^ b) - (((b << 24) | (b >> 8)) & m)) & m
    return c


class Fields:
    """Where a file laid out by rkckpt's writer keeps what changes with the stream's length, and its checksums.

    ``length_at``: file offsets of the 8-byte fields holding the stream
    length (dataspace dimension and maximum, layout size); ``eof_at``: the
    superblock's end-of-file address; ``spans``: checksummed metadata
    ``[start, end)`` (superblock, root and ``/rkckpt`` object header
    chunks), each followed by its lookup3 checksum. A plain class, not a
    dataclass: defining one costs about 0.5 ms at import, and this module is
    imported on every cold ``.rk.h5`` load.
    """

    __slots__ = ("eof_at", "length_at", "spans")

    def __init__(self, length_at: tuple[int, ...], eof_at: int, spans: tuple[tuple[int, int], ...]) -> None:
        self.length_at, self.eof_at, self.spans = length_at, eof_at, spans

    def __repr__(self) -> str:
        return f"Fields(length_at={self.length_at}, eof_at={self.eof_at}, spans={self.spans})"


def fields(source: Source, name: str = "rkckpt") -> Fields:
    """The ``Fields`` of a file ``locate`` accepts (the writer's template uses them to patch a layout)."""
    rd = _Bytes(source)
    sb = rd.get(0, 48)
    if sb[:8] != SIGNATURE or sb[8] not in (2, 3):
        raise NotFixedLayout("not a version 2/3 superblock")
    root = _u(sb, 36, 8)
    msgs, root_spans = _walk(rd, root)
    target = None
    for mtype, data, _ in msgs:
        if mtype == _MSG_LINK:
            lname, kind, address = _link(data)
            if lname == name and kind == 0:
                target = address
    if target is None:
        raise NotFixedLayout(f"no /{name} link")
    dmsgs, ds_spans = _walk(rd, target)
    length_at: list[int] = []
    for mtype, data, where in dmsgs:
        if mtype == _MSG_DATASPACE:
            version, rank, flags = _u(data, 0, 1), _u(data, 1, 1), _u(data, 2, 1)
            at = 8 if version == 1 else 4
            if rank != 1:
                raise NotFixedLayout("stream dataspace is not 1-D")
            length_at.append(where + at)
            if flags & 0x01:
                length_at.append(where + at + 8)  # maximum dimension
        elif mtype == _MSG_LAYOUT:
            length_at.append(where + 10)
    if len(length_at) < 2:
        raise NotFixedLayout("stream length fields not found")
    return Fields(tuple(length_at), 28, ((0, 44), *root_spans, *ds_spans))


def _link(data: bytes) -> tuple[str, int, int | None]:
    """(name, link type, object address for a hard link) of a link message."""
    if _u(data, 0, 1) != 1:
        raise NotFixedLayout("link message version is not 1")
    flags = _u(data, 1, 1)
    at = 2
    kind = 0
    if flags & 0x08:
        kind = _u(data, at, 1)
        at += 1
    if flags & 0x04:
        at += 8  # creation order
    if flags & 0x10:
        at += 1  # character set
    width = 1 << (flags & 0x03)
    n = _u(data, at, width)
    at += width
    if at + n > len(data):
        raise NotFixedLayout("link name runs past its message")
    name = data[at : at + n].decode("utf-8", "replace")
    at += n
    return name, kind, (_u(data, at, 8) if kind == 0 else None)


class _Type:
    """A datatype message's class, size and bit field (a plain class: see ``Fields``)."""

    __slots__ = ("bits", "cls", "size")

    def __init__(self, cls: int, size: int, bits: int) -> None:
        self.cls, self.size, self.bits = cls, size, bits


def _datatype(data: bytes) -> _Type:
    b0 = _u(data, 0, 1)
    return _Type(b0 & 0x0F, _u(data, 4, 4), _u(data, 1, 3))


def _dataspace(data: bytes) -> tuple[int, ...] | None:
    """Dimensions (``()`` for a scalar, None for a null dataspace)."""
    version, rank = _u(data, 0, 1), _u(data, 1, 1)
    if version == 1:
        at = 8
    elif version == 2:
        kind = _u(data, 3, 1)
        if kind == 2:
            return None
        at = 4
    else:
        raise NotFixedLayout(f"dataspace message version {version}")
    if rank > 32:
        raise NotFixedLayout(f"dataspace rank {rank}")
    return tuple(_u(data, at + 8 * i, 8) for i in range(rank))


def _attribute(rd: _Bytes, data: bytes) -> tuple[str, object]:
    """(name, value) of a scalar attribute of the kinds the writer stores: an integer or a vlen/fixed string."""
    version, flags = _u(data, 0, 1), _u(data, 1, 1)
    if flags & 0x03:
        raise NotFixedLayout("attribute with a shared datatype or dataspace")
    nname, ntype, nspace = _u(data, 2, 2), _u(data, 4, 2), _u(data, 6, 2)
    pad = (lambda n: (n + 7) & ~7) if version == 1 else (lambda n: n)
    if version not in (1, 2, 3):
        raise NotFixedLayout(f"attribute message version {version}")
    at = 9 if version == 3 else 8
    name = data[at : at + nname].rstrip(b"\0").decode("utf-8", "replace")
    at += pad(nname)
    dtype = _datatype(data[at : at + ntype])
    at += pad(ntype)
    dims = _dataspace(data[at : at + nspace])
    at += pad(nspace)
    if dims != ():
        return name, None  # not a scalar: not one of the wrapper's attributes
    value = data[at:]
    if dtype.cls == 0 and dtype.size in (1, 2, 4, 8):  # fixed-point
        signed = bool(dtype.bits & 0x08)
        if dtype.bits & 0x01:
            raise NotFixedLayout("big-endian integer attribute")
        return name, int.from_bytes(value[: dtype.size], "little", signed=signed) if len(value) >= dtype.size else None
    if dtype.cls == 3:  # fixed-length string
        return name, value[: dtype.size].split(b"\0", 1)[0].decode("utf-8", "replace")
    if dtype.cls == 9 and (dtype.bits & 0x0F) == 1:  # variable-length string: a global heap reference
        n, collection, index = _u(value, 0, 4), _u(value, 4, 8), _u(value, 12, 4)
        return name, _heap_object(rd, collection, index, n).decode("utf-8", "replace")
    return name, None


def _heap_object(rd: _Bytes, collection: int, index: int, n: int) -> bytes:
    """Object ``index`` of the global heap collection at ``collection`` (at most ``n`` bytes used)."""
    head = rd.get(collection, 16)
    if head[:4] != b"GCOL" or head[4] != 1:
        raise NotFixedLayout(f"global heap collection at {collection} has no GCOL signature")
    size = _u(head, 8, 8)
    if size < 16 or size > MAX_METADATA_BYTES:
        raise NotFixedLayout(f"global heap collection size {size}")
    body = rd.get(collection, size)
    at = 16
    for _ in range(size // 16 + 1):  # each object takes at least 16 bytes
        if at + 16 > size:
            break
        idx, osize = _u(body, at, 2), _u(body, at + 8, 8)
        if idx == 0:
            break  # free space: the end of the objects
        if osize > size - at - 16:
            raise NotFixedLayout("global heap object runs past its collection")
        if idx == index:
            if n > osize:
                raise NotFixedLayout("string longer than its global heap object")
            return body[at + 16 : at + 16 + n]
        at += 16 + ((osize + 7) & ~7)
    raise NotFixedLayout(f"global heap object {index} not found")


def locate(source: Source, name: str = "rkckpt") -> Located:
    """Where the stream dataset ``name`` lies, for files laid out as rkckpt writes them.

    Raises ``NotFixedLayout`` for any other layout (the caller falls back to
    libhdf5 behind a probe) and ``CheckpointError`` for a definite refusal.
    """
    rd = _Bytes(source)
    src = getattr(source, "name", None)
    if rd.size < 48:
        raise NotFixedLayout("file shorter than a version-2 superblock")
    sb = rd.get(0, 48)
    if sb[:8] != SIGNATURE:
        raise NotFixedLayout("no HDF5 signature at offset 0")
    if sb[8] not in (2, 3):
        raise NotFixedLayout(f"superblock version {sb[8]}")
    if sb[9] != 8 or sb[10] != 8:
        raise NotFixedLayout("offsets or lengths are not 8 bytes")
    base, ext, eof, root = (_u(sb, 12 + 8 * i, 8) for i in range(4))
    if base != 0 or ext != UNDEFINED:
        raise NotFixedLayout("superblock has a base address or an extension")
    if eof > rd.size:
        raise CheckpointError(src, f"truncated HDF5 file: its end-of-file address is {eof}, only {rd.size} bytes are present")
    attrs: dict[str, object] = {}
    target: int | None = None
    for mtype, data in _messages(rd, root):
        if mtype == _MSG_ATTR_INFO:
            if _u(data, 2, 8) != UNDEFINED:  # after version and flags: the dense storage heap address
                raise NotFixedLayout("root attributes are in dense storage")
        elif mtype == _MSG_ATTRIBUTE:
            key, value = _attribute(rd, data)
            if key in ("rkckpt.wrapper", "wrapper_version"):
                attrs[key] = value
        elif mtype == _MSG_LINK:
            lname, kind, address = _link(data)
            if lname == name:
                if kind != 0 or address is None:
                    raise NotFixedLayout(f"/{name} is not a hard link")
                target = address
    wrapper, version = attrs.get("rkckpt.wrapper"), attrs.get("wrapper_version")
    if not isinstance(wrapper, str) or not isinstance(version, int) or target is None:
        raise NotFixedLayout("no rkckpt.wrapper / wrapper_version attribute or /rkckpt link in the root group")
    dims: tuple[int, ...] | None = None
    dtype: _Type | None = None
    contiguous: tuple[int, int] | None = None
    for mtype, data in _messages(rd, target):
        if mtype == _MSG_DATASPACE:
            dims = _dataspace(data)
        elif mtype == _MSG_DATATYPE:
            dtype = _datatype(data)
        elif mtype in (_MSG_EXTERNAL, _MSG_FILTERS):
            raise NotFixedLayout(f"/{name} has external storage or filters")
        elif mtype == _MSG_LAYOUT:
            version_, cls = _u(data, 0, 1), _u(data, 1, 1)
            if version_ not in (3, 4) or cls != 1:
                raise NotFixedLayout(f"/{name} is not stored contiguously")
            contiguous = (_u(data, 2, 8), _u(data, 10, 8))
    if dims is None or len(dims) != 1 or dtype is None or dtype.cls != 0 or dtype.size != 1 or dtype.bits & 0x08:
        raise NotFixedLayout(f"/{name} is not a 1-D uint8 dataset")
    if contiguous is None:
        raise NotFixedLayout(f"/{name} has no layout message")
    offset, size = contiguous
    length = dims[0]
    if size != length:
        raise NotFixedLayout(f"/{name} stores {size} bytes for {length} elements")
    if offset == UNDEFINED or offset + length > rd.size:
        where = "unallocated" if offset == UNDEFINED else f"at offset {offset}"
        raise CheckpointError(src, f"/{name} claims {length} bytes {where}, but the file holds {rd.size} bytes: refused")
    return Located(offset, length, wrapper, version, eof)
