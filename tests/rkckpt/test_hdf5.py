"""``.rk.h5`` wrapping: byte-exact stream, attributes, index, partial reads, atomic writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_helpers import parse_path, sample_checkpoint, small_options, zstd_supported
from rkckpt import CheckpointError, codec, container, h5write, hdf5
from rkckpt.delta import apply_delta, make_delta
from rkckpt.flags import CHUNK_ZSTD
from rkckpt.model import Chunk, ChunkType


@pytest.mark.parametrize("compat", [True, False], ids=["compat", "extended"])
def test_roundtrip_and_stream_matches_format(tmp_path, compat):
    ck = sample_checkpoint()
    options = codec.COMPAT if compat else small_options()
    path = tmp_path / "s.rk.h5"
    size = hdf5.write_h5(path, ck, options)
    assert size == path.stat().st_size
    # the embedded stream is exactly what the .rkcp writer produces
    assert hdf5.read_stream(path) == container.encode(ck, options)
    back = container.read(path).checkpoint
    assert back.content_digest() == ck.content_digest()
    assert back.metadata == ck.metadata
    for name in ("pressure", "velocity", "mask"):
        np.testing.assert_array_equal(back.region(name), ck.region(name))
        np.testing.assert_array_equal(hdf5.read_region(path, name), ck.region(name))
        assert hdf5.read_region(path, name).dtype == ck.region(name).dtype
    hdf5.check_h5(path)
    assert not [p for p in tmp_path.iterdir() if p.name != "s.rk.h5"]  # no temp files left


def test_attributes_index_and_region_table(tmp_path):
    ck = sample_checkpoint(step=1234)
    path = tmp_path / "a.rk.h5"
    hdf5.write_h5(path, ck, codec.COMPAT)
    attrs = hdf5.attributes(path)
    assert attrs["kernel_id"] == "sample-0"
    assert attrs["kernel_type"] == "fdtd_3d"
    assert attrs["step"] == 1234
    assert attrs["kind"] == "full"
    assert attrs["content_digest"] == ck.content_digest()
    assert attrs["parent_digest"] == ""
    assert attrs["chain_base"] == ck.content_digest()
    assert attrs["format_version"] == 1
    parsed = container.read(hdf5.read_stream(path))
    index = hdf5.read_index(path)
    assert [(e.chunk_type, e.chunk_id, e.offset, e.stored_size) for e in index] == [
        (h.chunk_type, h.chunk_id, h.data_offset, h.compressed_size) for h in parsed.chunk_headers
    ]
    names = {e.chunk_id: e.name for e in index if e.name}
    assert sorted(names.values()) == ["mask", "pressure", "velocity"]
    with h5py.File(path, "r") as f:
        table = {r["name"].decode(): (r["dtype"].decode(), tuple(r["shape"])) for r in f["regions"][()]}
    assert table == {"mask": ("|u1", (4096,)), "pressure": ("<f4", (256, 16)), "velocity": ("<f8", (4096,))}


def test_delta_attributes(tmp_path):
    parent = sample_checkpoint(step=1)
    child = sample_checkpoint(step=2)
    child.add_region("pressure", np.ones((256, 16), np.float32))
    d = make_delta(parent, child)
    path = tmp_path / "d.rk.h5"
    hdf5.write_h5(path, d, codec.COMPAT, chain_base=parent.content_digest())
    attrs = hdf5.attributes(path)
    assert attrs["kind"] == "delta"
    assert attrs["parent_digest"] == parent.content_digest()
    assert attrs["chain_base"] == parent.content_digest()
    applied = apply_delta(parent, container.load(path))
    np.testing.assert_array_equal(applied.region("pressure"), child.region("pressure"))
    hdf5.check_h5(path)


def test_region_read_touches_only_its_slice(tmp_path):
    """Corrupting one region's bytes breaks the full read but not another region's read."""
    ck = sample_checkpoint()
    path = tmp_path / "p.rk.h5"
    hdf5.write_h5(path, ck, codec.COMPAT)
    vel = next(e for e in hdf5.read_index(path) if e.name == "velocity")
    with h5py.File(path, "a") as f:
        f["rkckpt"][vel.offset + 10] ^= 0xFF
    np.testing.assert_array_equal(hdf5.read_region(path, "pressure"), ck.region("pressure"))
    with pytest.raises(CheckpointError, match="CRC-32"):
        hdf5.read_region(path, "velocity")
    with pytest.raises(CheckpointError, match="checksum"):
        container.read(path)


def test_read_chunk_by_id(tmp_path):
    ck = sample_checkpoint()
    ck.chunks.append(Chunk(int(ChunkType.HLC_STATE), 0, b"hlc!"))
    path = tmp_path / "c.rk.h5"
    hdf5.write_h5(path, ck, codec.COMPAT)
    assert bytes(hdf5.read_chunk(path, 42)) == b"custom payload"
    assert bytes(hdf5.read_chunk(path, 0, int(ChunkType.CONTROL_BLOCK))) == bytes(range(128))
    assert bytes(hdf5.read_chunk(path, 0, int(ChunkType.HLC_STATE))) == b"hlc!"
    with pytest.raises(CheckpointError, match="give the chunk type"):
        hdf5.read_chunk(path, 0)
    with pytest.raises(CheckpointError, match="no chunk with id"):
        hdf5.read_chunk(path, 999)
    with pytest.raises(CheckpointError, match="no region named"):
        hdf5.read_region(path, "nope")


def test_check_detects_tampered_index_and_attributes(tmp_path):
    path = tmp_path / "t.rk.h5"
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    with h5py.File(path, "a") as f:
        f.attrs["step"] = np.uint64(99)
    with pytest.raises(CheckpointError, match="attribute step"):
        hdf5.check_h5(path)
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    with h5py.File(path, "a") as f:
        idx = f["index"][()]
        idx[1]["offset"] += 8
        f["index"][...] = idx
    with pytest.raises(CheckpointError, match="/index row 1"):
        hdf5.check_h5(path)
    with pytest.raises(CheckpointError, match="disagrees|outside"):
        hdf5.read_region(path, hdf5.read_index(path)[1].name or "pressure")


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.rk.h5"
    old = sample_checkpoint(step=1)
    hdf5.write_h5(path, old, codec.COMPAT)
    before = path.read_bytes()

    def boom():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(h5write, "index_dtype", boom)  # fails after the stream is written ...
    monkeypatch.setattr(h5write._Template, "render", lambda self, facts, length: boom())  # ... from a template too
    with pytest.raises(RuntimeError, match="disk on fire"):
        hdf5.write_h5(path, sample_checkpoint(step=2), codec.COMPAT)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.rk.h5"]


@pytest.mark.skipif(not zstd_supported(), reason="codec does not compress yet")
def test_compressed_region_read(tmp_path):
    ck = sample_checkpoint()
    path = tmp_path / "z.rk.h5"
    hdf5.write_h5(path, ck, small_options())
    index = {e.name: e for e in hdf5.read_index(path)}
    assert index["mask"].flags & CHUNK_ZSTD  # zeros compress
    assert index["mask"].stored_size < index["mask"].uncompressed_size
    for name in ("pressure", "velocity", "mask"):
        np.testing.assert_array_equal(hdf5.read_region(path, name), ck.region(name))
    assert parse_path(path).checkpoint.content_digest() == ck.content_digest()
    hdf5.check_h5(path)


def test_compat_file_has_no_extension_bits(tmp_path):
    path = tmp_path / "compat.rk.h5"
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    parsed = container.read(hdf5.read_stream(path))
    assert parsed.header.flags == 0 and parsed.header.compression == 0
    assert all(h.flags == 0 for h in parsed.chunk_headers)


@pytest.mark.parametrize("la,lb", [(0, 0), (0, 5), (5, 0), (1, 1), (13, 4096), (100000, 77777)])
def test_crc32_combine_matches_zlib(la, lb):
    import zlib

    from rkckpt.crc import crc32_combine

    rng = np.random.default_rng(la * 7 + lb)
    a, b = rng.bytes(la), rng.bytes(lb)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)


@pytest.mark.parametrize("how", ["gzip", "chunked", "never-written-1GiB"])
def test_non_contiguous_stream_dataset_is_refused_without_reading(tmp_path, how):
    """A /rkckpt rewritten chunked or compressed (h5repack), or a 1 GiB chunked one never
    written (a 9 KB file), is refused without reading it: no reader allocates its size."""
    import resource

    path = tmp_path / "repacked.rk.h5"
    ck = sample_checkpoint()
    hdf5.write_h5(path, ck, codec.COMPAT)
    with h5py.File(path, "a") as f:
        data = f["rkckpt"][()]
        del f["rkckpt"]
        if how == "gzip":
            f.create_dataset("rkckpt", data=data, chunks=(1024,), compression="gzip")
        elif how == "chunked":
            f.create_dataset("rkckpt", data=data, chunks=(1024,))
        else:
            f.create_dataset("rkckpt", shape=(1 << 30,), dtype="u1", chunks=(1 << 20,), compression="gzip")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for read in (container.read, hdf5.check_h5, hdf5.read_index, lambda p: hdf5.read_region(p, "velocity"), hdf5.open_stream):
        with pytest.raises(CheckpointError, match="not contiguous: refused without reading") as exc:
            read(path)
        assert exc.value.source == str(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB: nothing near 1 GiB


def test_contiguous_stream_longer_than_the_file_is_refused(tmp_path):
    """A /rkckpt whose declared size runs past the end of the file is refused before any read."""
    path = tmp_path / "short.rk.h5"
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    data = path.read_bytes()
    loc = hdf5.h5layout.locate(hdf5.FileSource(path))
    path.write_bytes(data[: loc.offset + loc.length // 2])
    with pytest.raises(CheckpointError, match="truncated HDF5 file|file holds") as exc:
        container.read(path)
    assert exc.value.source == str(path)


def test_hot_path_needs_no_h5py(tmp_path):
    """Restore-path reads of a file this writer laid out locate the stream without importing h5py."""
    import subprocess
    import sys

    path = tmp_path / "x.rk.h5"
    ck = sample_checkpoint()
    hdf5.write_h5(path, ck, small_options())
    code = (
        "import sys\n"
        "from rkckpt import container, chain\n"
        "from rkckpt.storage.file import FileStorage  # noqa: F401 - the restore path imports it\n"
        f"ck = container.read({str(path)!r}).checkpoint\n"
        "print(ck.content_digest(), 'h5py' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [ck.content_digest(), "False"]


_chunk = st.tuples(
    st.sampled_from([1, 2, 3, 4, 5, 7, 8, 100, 12345]),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=3000) | st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 20000), st.integers(0, 255)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunks=st.lists(_chunk, max_size=6, unique_by=lambda c: (c[0], c[1] if c[0] in (5, 100) else 0)),
    custom=st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3),
    compat=st.booleans(),
)
def test_roundtrip_property(tmp_path, chunks, custom, compat):
    from rkckpt.model import Checkpoint, Metadata

    ck = Checkpoint(Metadata("k\u00e9", "t", 3, custom=custom), [Chunk(t, i, d) for t, i, d in chunks], created_at=5)
    ck.add_region("field", np.arange(97, dtype=np.float64))
    path = tmp_path / "p.rk.h5"
    hdf5.write_h5(path, ck, codec.COMPAT if compat else small_options())
    back = hdf5.check_h5(path).checkpoint
    assert back.metadata == ck.metadata
    assert [(c.chunk_type, c.chunk_id, bytes(c.data)) for c in back.chunks] == [
        (c.chunk_type, c.chunk_id, bytes(c.data)) for c in ck.chunks
    ]
    assert hdf5.read_stream(path) == container.encode(ck, codec.COMPAT if compat else small_options())
    np.testing.assert_array_equal(hdf5.read_region(path, "field"), np.arange(97, dtype=np.float64))


def test_probe_survives_a_crashing_or_hanging_hdf5_library(tmp_path, monkeypatch):
    """libhdf5 can SIGSEGV or spin on damaged metadata; the probe runs it in a child."""
    import os
    import signal
    import time

    path = tmp_path / "p.rk.h5"
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    hdf5.probe(path)  # healthy file: no error
    hdf5._PROBED.clear()  # the verdict is remembered per file identity: forget it for the next cases
    monkeypatch.setattr(hdf5._Opened, "attrs", lambda self: os.kill(os.getpid(), signal.SIGSEGV))
    with pytest.raises(CheckpointError, match="crashed") as exc:
        hdf5.probe(path)
    assert exc.value.source == str(path)
    with pytest.raises(CheckpointError, match="crashed"):  # remembered: no second child
        hdf5.probe(path)
    hdf5._PROBED.clear()
    monkeypatch.setattr(hdf5._Opened, "attrs", lambda self: time.sleep(30))
    with pytest.raises(CheckpointError, match="did not finish"):
        hdf5.probe(path, timeout=0.5)
    monkeypatch.undo()
    bad = tmp_path / "bad.rk.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="HDF5"):
        hdf5.probe(bad)


def _other_layout(src, dst) -> None:
    """The same checkpoint as h5py lays it out by default (superblock 0, symbol-table root group):
    another tool's file, not what h5layout.locate parses, so libhdf5 reads it."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        for k, v in a.attrs.items():
            b.attrs[k] = v
        b.create_dataset("rkckpt", data=a["rkckpt"][()])
        a.copy("index", b)
        a.copy("regions", b)


@pytest.mark.parametrize("layout", ["dense attributes (the writer before)", "h5py default"])
def test_other_layout_reads_through_the_probe_locally_and_from_storage(tmp_path, monkeypatch, layout):
    from rkckpt import h5layout
    from rkckpt.chain import load_checkpoint, read_region
    from rkckpt.source import FileSource
    from rkckpt.storage import MemoryStorage

    ck = sample_checkpoint()
    fresh, other = tmp_path / "fresh.rk.h5", tmp_path / "sample-0-000000000007-full.rk.h5"
    hdf5.write_h5(fresh, ck, codec.COMPAT)
    if layout.startswith("dense"):
        with monkeypatch.context() as m:
            m.setattr(h5write, "MAX_COMPACT_ATTRS", 8)  # 12 attributes: dense storage, as the writer did before
            m.setattr(h5write, "_OFFSETS", {})
            m.setattr(h5write, "_TEMPLATES", {})
            hdf5.write_h5(other, ck, codec.COMPAT)
    else:
        _other_layout(fresh, other)
    with FileSource(other) as fs, pytest.raises(h5layout.NotFixedLayout, match="dense|superblock version 0"):
        h5layout.locate(fs)
    assert container.read(other).checkpoint.content_digest() == ck.content_digest()
    hdf5.check_h5(other)
    store = MemoryStorage()
    store.save(other.name, other.read_bytes())
    assert load_checkpoint(store, other.name).content_digest() == ck.content_digest()
    np.testing.assert_array_equal(read_region(store, other.name, "velocity"), ck.region("velocity"))
    store.save("sample-0-000000000007-full.rk.h5", fresh.read_bytes())  # ours: structure copied sparse, stream range-read
    np.testing.assert_array_equal(read_region(store, other.name, "pressure"), ck.region("pressure"))


def test_template_writes_the_bytes_a_fresh_layout_writes(tmp_path, monkeypatch):
    """Checkpoints of one shape are written by patching one layout (no h5py per checkpoint); the bytes
    equal those of a fresh HDF5 layout of each, fulls and deltas, of different lengths and values."""
    monkeypatch.setattr(h5write, "_TEMPLATES", {})
    rng = np.random.default_rng(5)
    cks = []
    prev = None
    for step in (1, 2, 3, 4):
        ck = sample_checkpoint(step=step)
        ck.created_at = 1_700_000_000_000_000 + step * 7919
        ck.add_region("pressure", rng.random((256, 16), dtype=np.float32) * (step if step != 3 else 0))
        cks.append((ck, None))
        if prev is not None:
            cks.append((make_delta(prev, ck), prev.content_digest()))
        prev = ck
    for options in (codec.COMPAT, small_options()):
        for i, (ck, base) in enumerate(cks):
            patched, fresh = tmp_path / f"p{i}.rk.h5", tmp_path / f"f{i}.rk.h5"
            hdf5.write_h5(patched, ck, options, chain_base=base)
            with monkeypatch.context() as m:
                m.setattr(h5write, "_make_template", lambda *a: None)
                m.setattr(h5write, "_TEMPLATES", {})
                hdf5.write_h5(fresh, ck, options, chain_base=base)
            assert patched.read_bytes() == fresh.read_bytes(), (i, options)
            raw = patched.read_bytes()
            heads = [raw[at + 5] for at in range(len(raw)) if raw.startswith(b"OHDR\x02", at)]
            assert heads and not any(flags & 0x20 for flags in heads)  # no object records a time: no clock in the bytes
            hdf5.check_h5(patched)
    assert any(t is not None for t in h5write._TEMPLATES.values())
