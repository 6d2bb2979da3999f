"""The reference vectors (ringkernel-core 1.1.0) agree with manifest.json."""

from __future__ import annotations

import json
import shutil
import zlib

import h5py
import pytest

from ckpt_helpers import VECTOR_FILES, load_path, parse_path, vector_bytes
from rkckpt import CheckpointError, codec, container, hdf5
from rkckpt.delta import apply_delta
from rkckpt.describe import describe_file
from rkckpt.model import Checkpoint
from rkckpt.siphash import region_id

HEADER_KEYS = ("version", "header_size", "total_size", "chunk_count", "compression", "checksum", "flags")
META_KEYS = ("kernel_id", "kernel_type", "current_step")


@pytest.fixture(scope="module")
def manifest(vectors_dir):
    return json.loads((vectors_dir / "manifest.json").read_text())


def assert_state(ck: Checkpoint, want: dict) -> None:
    m = ck.metadata
    for k in META_KEYS:
        assert getattr(m, k) == want[k], k
    assert list(m.grid_size) == want["grid_size"]
    assert list(m.tile_size) == want["tile_size"]
    assert list(m.hlc) == want["hlc"]
    assert m.custom == want["custom"]  # a mapping: the reference's order is arbitrary
    assert ck.content_digest() == want["content_digest"]
    assert len(ck.chunks) == len(want["chunks"])
    for c, w in zip(ck.chunks, want["chunks"], strict=True):
        assert (c.chunk_type, c.flags, c.size, c.chunk_id) == (w["type"], w["flags"], w["uncompressed_size"], w["chunk_id"])
        assert zlib.crc32(c.data) & 0xFFFFFFFF == w["crc32_of_data"]


def assert_header(parsed: container.ParsedFile, want: dict) -> None:
    h = parsed.header
    for k in HEADER_KEYS:
        assert getattr(h, k) == want["header"][k], k
    for ch, w in zip(parsed.chunk_headers, want["chunks"], strict=True):
        assert (ch.chunk_type, ch.flags, ch.uncompressed_size, ch.compressed_size, ch.chunk_id) == (
            w["type"],
            w["flags"],
            w["uncompressed_size"],
            w["compressed_size"],
            w["chunk_id"],
        )


@pytest.mark.parametrize("name", VECTOR_FILES)
def test_vector_agrees_with_manifest(vectors_dir, manifest, name):
    parsed = parse_path(vectors_dir / f"{name}.rkcp")
    want = manifest["files"][name]
    assert_header(parsed, want)
    assert_state(parsed.checkpoint, want)


@pytest.mark.parametrize("name", VECTOR_FILES)
def test_inspect_json_agrees_with_manifest(vectors_dir, manifest, name):
    info = describe_file(container.read(vectors_dir / f"{name}.rkcp"))
    want = manifest["files"][name]
    assert {k: info["header"][k] for k in HEADER_KEYS} == want["header"]
    assert info["content_digest"] == want["content_digest"]
    assert info["metadata"]["custom"] == want["custom"]
    assert [(c["type"], c["chunk_id"], c["crc32"], c["compressed_size"]) for c in info["chunks"]] == [
        (w["type"], w["chunk_id"], w["crc32_of_data"], w["compressed_size"]) for w in want["chunks"]
    ]
    json.dumps(info)  # serialisable as is


@pytest.mark.parametrize("applied,deltas", [("applied_1010", ["delta_step1010"]), ("applied_1020", ["delta_step1010", "delta_step1020"])])
def test_applied_states(vectors_dir, manifest, applied, deltas):
    state = load_path(vectors_dir / "full_step1000.rkcp")
    for d in deltas:
        state = apply_delta(state, load_path(vectors_dir / f"{d}.rkcp"))
    want = manifest[applied]
    assert_state(state, want)
    # re-encoded in compatible mode, the header is what the reference wrote
    raw = container.encode(state, codec.COMPAT)
    parsed = container.read(raw, applied)
    assert_header(parsed, want)
    assert_state(parsed.checkpoint, want)


def test_chain_rejects_wrong_parent(vectors_dir):
    full = load_path(vectors_dir / "full_step1000.rkcp")
    with pytest.raises(CheckpointError, match="parent digest"):
        apply_delta(full, load_path(vectors_dir / "delta_step1020.rkcp"))


def test_name_ids(manifest):
    for name, cid in manifest["name_ids"].items():
        assert region_id(name) == int(cid), name


@pytest.mark.parametrize("name,problem", [("corrupt_bitflip", "checksum"), ("corrupt_truncated", "truncated")])
def test_corrupt_vectors_rejected(vectors_dir, name, problem):
    path = vectors_dir / f"{name}.rkcp"
    with pytest.raises(CheckpointError, match=problem) as exc:
        parse_path(path)
    assert exc.value.source == str(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("name", VECTOR_FILES)
def test_vector_in_hdf5_extracts_byte_exact(vectors_dir, manifest, tmp_path, name):
    raw = vector_bytes(vectors_dir, name)
    ck = container.read(raw, name).checkpoint
    out = tmp_path / f"{name}.rk.h5"
    hdf5.write_h5(out, ck, codec.COMPAT)
    with h5py.File(out, "r") as f:
        extracted = f["/rkckpt"][()].tobytes()
        assert f["/rkckpt"].id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS
        assert f.attrs["content_digest"] == manifest["files"][name]["content_digest"]
        assert f.attrs["kind"] == ("delta" if name.startswith("delta") else "full")
    assert extracted == raw  # what the reference reader parses
    parsed = parse_path(out)
    assert_header(parsed, manifest["files"][name])
    assert_state(parsed.checkpoint, manifest["files"][name])


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (hdf5-tools) not installed")
def test_h5dump_extracts_the_stream(vectors_dir, tmp_path):
    import subprocess

    raw = vector_bytes(vectors_dir, "full_step1000")
    out = tmp_path / "full.rk.h5"
    hdf5.write_h5(out, container.read(raw).checkpoint, codec.COMPAT)
    dumped = tmp_path / "stream.bin"
    subprocess.run(["h5dump", "-d", "/rkckpt", "-b", "LE", "-o", str(dumped), str(out)], check=True, capture_output=True)
    assert dumped.read_bytes() == raw
