"""The ``rkckpt`` command's stable contract, run as the installed program."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from ckpt_helpers import VECTOR_FILES, sample_checkpoint, small_options, zstd_supported
from rkckpt import codec, container

RKCKPT = shutil.which("rkckpt")
pytestmark = pytest.mark.skipif(RKCKPT is None, reason="rkckpt is not installed (pip install -e .)")

TOP_KEYS = {"header", "metadata", "content_digest", "chunks"}
HEADER_KEYS = {"version", "header_size", "total_size", "chunk_count", "compression", "checksum", "flags", "created_at"}
META_KEYS = {"kernel_id", "kernel_type", "current_step", "grid_size", "tile_size", "hlc", "custom"}
CHUNK_KEYS = {"type", "flags", "uncompressed_size", "compressed_size", "chunk_id", "crc32"}


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RKCKPT, *map(str, args)], capture_output=True, text=True, timeout=60)


def inspect_json(path) -> dict:
    proc = run("inspect", "--json", path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int, *names: object) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for n in names:
        assert str(n) in proc.stderr


@pytest.fixture(scope="module")
def manifest(vectors_dir):
    return json.loads((vectors_dir / "manifest.json").read_text())


@pytest.fixture
def sample_files(tmp_path):
    ck = sample_checkpoint()
    rkcp = tmp_path / "sample.rkcp"
    rkcp.write_bytes(container.encode(ck, codec.COMPAT))
    h5 = tmp_path / "sample.rk.h5"
    proc = run("convert", rkcp, h5)
    assert proc.returncode == 0, proc.stderr
    return ck, rkcp, h5


def test_inspect_json_contract(vectors_dir, manifest, tmp_path):
    for name in VECTOR_FILES:
        info = inspect_json(vectors_dir / f"{name}.rkcp")
        want = manifest["files"][name]
        assert set(info) == TOP_KEYS
        assert set(info["header"]) == HEADER_KEYS
        assert set(info["metadata"]) == META_KEYS
        assert {k: info["header"][k] for k in want["header"]} == want["header"]
        assert info["content_digest"] == want["content_digest"]
        m = info["metadata"]
        assert (m["kernel_id"], m["kernel_type"], m["current_step"]) == (want["kernel_id"], want["kernel_type"], want["current_step"])
        assert (m["grid_size"], m["tile_size"], m["hlc"], m["custom"]) == (
            want["grid_size"],
            want["tile_size"],
            want["hlc"],
            want["custom"],
        )
        for c, w in zip(info["chunks"], want["chunks"], strict=True):
            assert set(c) - {"name"} == CHUNK_KEYS
            assert isinstance(c["chunk_id"], int)
            assert (c["type"], c["flags"], c["uncompressed_size"], c["compressed_size"], c["chunk_id"], c["crc32"]) == (
                w["type"],
                w["flags"],
                w["uncompressed_size"],
                w["compressed_size"],
                w["chunk_id"],
                w["crc32_of_data"],
            )
    # the same file wrapped in HDF5 inspects identically
    h5 = tmp_path / "full.rk.h5"
    assert run("convert", vectors_dir / "full_step1000.rkcp", h5, "--compat").returncode == 0
    assert inspect_json(h5) == inspect_json(vectors_dir / "full_step1000.rkcp")


def test_inspect_names_regions_and_prints_table(sample_files):
    _, rkcp, h5 = sample_files
    for path in (rkcp, h5):
        names = {c["name"] for c in inspect_json(path)["chunks"] if "name" in c}
        assert names == {"pressure", "velocity", "mask"}
    proc = run("inspect", rkcp)
    assert proc.returncode == 0
    assert "sample-0" in proc.stdout and "pressure" in proc.stdout


def test_inspect_errors(vectors_dir, tmp_path):
    for name in ("corrupt_bitflip", "corrupt_truncated"):
        path = vectors_dir / f"{name}.rkcp"
        assert_clean_failure(run("inspect", "--json", path), 1, path)
    missing = tmp_path / "missing.rkcp"
    assert_clean_failure(run("inspect", missing), 1, missing)
    fake = tmp_path / "fake.rk.h5"
    fake.write_text("hello")
    assert_clean_failure(run("inspect", fake), 1, fake)
    assert_clean_failure(run("inspect"), 2)


def test_verify(vectors_dir, tmp_path, sample_files):
    _, rkcp, h5 = sample_files
    good = [vectors_dir / f"{n}.rkcp" for n in VECTOR_FILES] + [rkcp, h5]
    proc = run("verify", *good)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    bad = [vectors_dir / "corrupt_bitflip.rkcp", vectors_dir / "corrupt_truncated.rkcp", tmp_path / "missing.rkcp"]
    proc = run("verify", good[0], *bad, good[-1])
    assert_clean_failure(proc, 1, *bad)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(bad)
    for line, path in zip(lines, bad, strict=True):
        assert str(path) in line
    assert_clean_failure(run("verify"), 2)


def test_convert_round_trip_is_byte_exact(vectors_dir, tmp_path):
    for name in VECTOR_FILES:
        src = vectors_dir / f"{name}.rkcp"
        h5 = tmp_path / f"{name}.rk.h5"
        back = tmp_path / f"{name}.rkcp"
        assert run("convert", src, h5, "--compat").returncode == 0
        assert run("convert", h5, back, "--compat").returncode == 0
        assert back.read_bytes() == src.read_bytes()
    proc = run("convert", vectors_dir / "full_step1000.rkcp", tmp_path / "out.txt")
    assert_clean_failure(proc, 2, "out.txt")
    assert_clean_failure(run("convert", vectors_dir / "corrupt_bitflip.rkcp", tmp_path / "x.rkcp"), 1, "corrupt_bitflip.rkcp")
    assert not (tmp_path / "x.rkcp").exists()


@pytest.mark.skipif(not zstd_supported(), reason="codec does not compress yet")
def test_convert_extended_compresses(sample_files, tmp_path):
    ck, rkcp, _ = sample_files
    out = tmp_path / "z.rkcp"
    assert run("convert", rkcp, out, "--compress", "always").returncode == 0
    info = inspect_json(out)
    assert info["header"]["compression"] == 2
    assert info["content_digest"] == ck.content_digest()
    compat = tmp_path / "c.rkcp"
    assert run("convert", out, compat, "--compat").returncode == 0
    assert compat.read_bytes() == rkcp.read_bytes()


def test_apply_chain(vectors_dir, manifest, tmp_path):
    full, d1, d2 = (vectors_dir / f"{n}.rkcp" for n in VECTOR_FILES)
    for out, want in ((tmp_path / "a1020.rkcp", "applied_1020"), (tmp_path / "a1020.rk.h5", "applied_1020")):
        proc = run("apply", full, d1, d2, "-o", out, "--compat")
        assert proc.returncode == 0, proc.stderr
        info = inspect_json(out)
        assert info["content_digest"] == manifest[want]["content_digest"]
        assert {k: info["header"][k] for k in manifest[want]["header"]} == manifest[want]["header"]
    one = tmp_path / "a1010.rkcp"
    assert run("apply", full, d1, "-o", one, "--compat").returncode == 0
    assert inspect_json(one)["content_digest"] == manifest["applied_1010"]["content_digest"]
    # wrong parent: names the delta, says why
    proc = run("apply", full, d2, "-o", tmp_path / "bad.rkcp")
    assert_clean_failure(proc, 1, d2, "parent digest")
    assert not (tmp_path / "bad.rkcp").exists()
    assert_clean_failure(run("apply", full, "-o", tmp_path / "x.rkcp"), 2)


def test_export(sample_files, tmp_path):
    ck, rkcp, h5 = sample_files
    for src in (rkcp, h5):
        for name in ("pressure", "velocity", "mask"):
            out = tmp_path / f"{src.suffix}-{name}.npy"
            proc = run("export", src, "--region", name, "-o", out)
            assert proc.returncode == 0, proc.stderr
            arr = np.load(out, allow_pickle=False)
            np.testing.assert_array_equal(arr, ck.region(name))
            assert arr.dtype == ck.region(name).dtype and arr.shape == ck.region(name).shape
        raw = tmp_path / f"{src.suffix}-custom.npy"
        assert run("export", src, "--chunk-id", 42, "-o", raw).returncode == 0
        arr = np.load(raw, allow_pickle=False)
        assert arr.dtype == np.uint8 and arr.tobytes() == b"custom payload"
        assert_clean_failure(run("export", src, "--region", "nope", "-o", tmp_path / "n.npy"), 1, src, "nope")
        assert_clean_failure(run("export", src, "--chunk-id", 12345, "-o", tmp_path / "n.npy"), 1, src)
        assert_clean_failure(run("export", src, "-o", tmp_path / "n.npy"), 2)
        assert_clean_failure(run("export", src, "--region", "mask", "--chunk-id", 42, "-o", tmp_path / "n.npy"), 2)
    assert not (tmp_path / "n.npy").exists()


def test_block_delta_needs_base_for_compat(tmp_path):
    from rkckpt.delta import make_delta
    from rkckpt.flags import CHUNK_BLOCK_DELTA

    parent = sample_checkpoint(step=1, n=1 << 16)
    child = sample_checkpoint(step=2, n=1 << 16)
    arr = child.region("velocity").copy()
    arr[100:110] += 1.0
    child.add_region("velocity", arr)
    try:
        d = make_delta(parent, child, mode="block")  # type: ignore[call-arg]
    except TypeError:
        pytest.skip("block deltas not implemented yet")
    if not any(c.flags & CHUNK_BLOCK_DELTA for c in d.chunks):
        pytest.skip("block delta stored whole chunks")
    base = tmp_path / "base.rkcp"
    base.write_bytes(container.encode(parent, codec.COMPAT))
    delta = tmp_path / "delta.rkcp"
    delta.write_bytes(container.encode(d, small_options()))
    assert_clean_failure(run("convert", delta, tmp_path / "c.rkcp", "--compat"), 1, delta)
    assert run("verify", delta).returncode == 0
    out = tmp_path / "full.rk.h5"
    proc = run("apply", base, delta, "-o", out, "--compat")
    assert proc.returncode == 0, proc.stderr
    assert run("export", out, "--region", "velocity", "-o", tmp_path / "v.npy").returncode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), arr)


def test_human_output_is_not_rich_markup(tmp_path):
    ck = sample_checkpoint()
    ck.metadata = ck.metadata.with_custom(**{"[bold]key": "[/]value"})
    path = tmp_path / "[red]odd.rkcp"
    path.write_bytes(container.encode(ck, codec.COMPAT))
    proc = run("inspect", path)
    assert proc.returncode == 0, proc.stderr
    assert "[bold]key" in proc.stdout and "[/]value" in proc.stdout and "[red]odd.rkcp" in proc.stdout


def test_verify_checks_the_hdf5_wrapper(sample_files):
    import h5py

    _, _, h5 = sample_files
    with h5py.File(h5, "a") as f:
        f.attrs["step"] = np.uint64(999)
    proc = run("verify", h5)
    assert_clean_failure(proc, 1, h5, "step")


def test_sharded_file_inspects_and_exports(tmp_path, monkeypatch):
    """A sharded .rkcp (states over 1 GiB; here with a small shard limit) lists whole chunks."""
    from rkckpt import shard
    from rkckpt.describe import describe_file

    monkeypatch.setattr(shard, "MAX_STREAM", 6 << 20)
    ck = sample_checkpoint()
    big = np.random.default_rng(0).standard_normal(2 << 20).astype(np.float32)
    ck.add_region("big", big)
    path = tmp_path / "sharded.rkcp"
    container.write(path, ck, codec.WriteOptions())
    parsed = container.read(path)
    if len(parsed.chunk_headers) == len(parsed.checkpoint.chunks):
        pytest.skip("the shard limit did not split a chunk")
    info = describe_file(parsed)
    assert [c["uncompressed_size"] for c in info["chunks"]] == [c.size for c in ck.chunks]
    assert info["content_digest"] == ck.content_digest()
    assert inspect_json(path)["chunks"] == info["chunks"]
    out = tmp_path / "big.npy"
    assert run("export", path, "--region", "big", "-o", out).returncode == 0
    np.testing.assert_array_equal(np.load(out), big)
    assert run("verify", path).returncode == 0
