"""Fuzz the RKCKPT parser: every mutation ends in CheckpointError or a correct parse.

The mutations run in a child process under ``RLIMIT_AS`` (2 GiB: the
format's own 1 GiB chunk limit plus the interpreter and thread stacks), so a
parser that trusted a size field beyond that and tried to allocate it fails
the test with a MemoryError instead of swapping the machine; pytest-timeout
bounds the time. The seed is fixed, so a failure is reproducible from its case
number: ``python tests/rkckpt/test_fuzz.py --worker SEED N`` replays the run.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import traceback
import zlib

import pytest

from helpers import VECTORS

SEED = 20251129
CASES = int(os.environ.get("RKCKPT_FUZZ_CASES", "3000"))
MEMORY_LIMIT = 2 << 30


def _seeds() -> list[tuple[str, bytes]]:
    """Valid files to mutate: the reference vectors plus our own encodings."""
    from ckpt_helpers import sample_checkpoint, small_options
    from rkckpt import codec, container
    from rkckpt.delta import make_delta

    vectors = VECTORS
    out = [(p.stem, p.read_bytes()) for p in sorted(vectors.glob("*_step*.rkcp"))]
    small = sample_checkpoint(n=512)
    out.append(("sample-compat", container.encode(small, codec.COMPAT)))
    out.append(("sample-extended", container.encode(small, small_options())))
    smooth = sample_checkpoint(n=4096)
    try:  # several shuffled zstd frames per chunk, so the frame tables get mutated too
        framed = small_options(block_size=4096, min_ratio=1.0)
    except (TypeError, ValueError):
        framed = small_options()
    out.append(("sample-frames", container.encode(smooth, framed)))
    child = sample_checkpoint(step=8, n=4096)
    vel = child.region("velocity").copy()
    vel[1000:1010] += 1.0  # a small change: a block patch, not the whole chunk
    child.add_region("velocity", vel)
    for mode in ("block", "whole"):
        try:
            d = make_delta(smooth, child, mode=mode)  # type: ignore[call-arg]
        except TypeError:  # codec engineer's block deltas not there yet
            d = make_delta(small, child)
        out.append((f"delta-{mode}", container.encode(d, small_options())))
    return out


def _fix_checksum(buf: bytearray) -> None:
    if len(buf) >= 64:
        struct.pack_into("<I", buf, 32, zlib.crc32(bytes(buf[64:])) & 0xFFFFFFFF)


_INTERESTING = [0, 1, 7, 8, 31, 32, 33, 56, 64, 255, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 30, (1 << 30) + 1, 2**63, 2**64 - 1]


def _mutate(rng: random.Random, raw: bytes) -> tuple[bytearray, str]:
    buf = bytearray(raw)
    kind = rng.choice(["bitflip", "byteset", "truncate", "insert", "delete", "field", "field", "chunkfield", "metafield"])
    fix = kind in ("field", "chunkfield", "metafield") or rng.random() < 0.5
    if kind == "bitflip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "byteset":
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif kind == "truncate":
        del buf[rng.randrange(len(buf)) :]
    elif kind == "insert":
        i = rng.randrange(len(buf) + 1)
        buf[i:i] = rng.randbytes(rng.randint(1, 64))
    elif kind == "delete":
        i = rng.randrange(len(buf))
        del buf[i : i + rng.randint(1, 64)]
    else:
        if kind == "field":  # header fields
            at, fmt = rng.choice([(8, "<I"), (12, "<I"), (16, "<Q"), (24, "<I"), (28, "<I"), (36, "<I"), (64, "<I")])
        elif kind == "metafield":  # u32 length/count somewhere in the metadata
            at, fmt = 64 + 4 * rng.randrange(1, 30), "<I"
        else:  # a chunk header field: scan for a plausible chunk header offset
            at, fmt = rng.randrange(64, max(65, len(buf) - 8)), rng.choice(["<I", "<Q"])
        size = struct.calcsize(fmt)
        value = rng.choice(_INTERESTING) if rng.random() < 0.7 else rng.getrandbits(size * 8)
        if at + size <= len(buf):
            struct.pack_into(fmt, buf, at, value & ((1 << (size * 8)) - 1))
        kind = f"{kind}@{at}={value}"
        if rng.random() < 0.5 and len(buf) >= 24:  # keep total_size consistent so deeper checks run
            struct.pack_into("<Q", buf, 16, max(0, len(buf) - 8))
    if fix:
        _fix_checksum(buf)
    return buf, kind + ("+crc" if fix else "")


def _check_parse(parsed, buf: bytes) -> None:
    """A successful parse must be self-consistent, not just exception-free."""
    from ckpt_helpers import small_options
    from rkckpt import codec, container

    assert len(parsed.chunk_headers) == parsed.header.chunk_count == len(parsed.checkpoint.chunks)
    for ch, c in zip(parsed.chunk_headers, parsed.checkpoint.chunks, strict=True):
        assert c.size == ch.uncompressed_size, "chunk size differs from its header"
        assert ch.data_offset + ch.compressed_size <= len(buf)
    ck = parsed.checkpoint
    plain = parsed.header.compression == 0 and parsed.header.flags == 0 and not any(h.flags for h in parsed.chunk_headers)
    again = bytearray(container.encode(ck, codec.COMPAT if plain else small_options()))
    back = container.read(bytes(again), "re-encoded").checkpoint
    assert back.metadata == ck.metadata, "metadata changes on re-encoding"
    assert back.content_digest() == ck.content_digest(), "content changes on re-encoding"
    custom = list(ck.metadata.custom)
    if plain and custom == sorted(custom) and len(again) == len(buf):
        # plain files with sorted keys re-encode to the same bytes (modulo header quirks)
        assert bytes(again[64:]) == bytes(buf[64:]), "re-encoding differs"


def _bombs() -> list[str]:
    """Zstd bombs (4 GiB of RLE blocks in a few KiB) must fail without allocating."""
    from ckpt_helpers import zstd_supported
    from hostile_inputs import frames_payload, rle_frame, zstd_chunk_stream
    from rkckpt import CheckpointError, container

    if not zstd_supported():
        return ["skipped: no zstd"]
    out = []
    for label, frame in (("no content size", rle_frame(4 << 30)), ("lying content size", rle_frame(4 << 30, declared=100))):
        buf = zstd_chunk_stream(frames_payload([frame], block_size=1 << 20), 100)
        try:
            container.read(buf, "bomb")
            out.append(f"{label}: FAILED, parsed")
        except CheckpointError:
            out.append(f"{label}: rejected")
        except BaseException as exc:  # noqa: BLE001
            out.append(f"{label}: FAILED, {type(exc).__name__}: {exc}")
    return out


def _outcome(parse, arg, source: str) -> tuple[str, object]:
    """("ok", parsed) | ("rejected", message) | ("bug", description)."""
    from rkckpt import CheckpointError

    try:
        return "ok", parse(arg)
    except CheckpointError as exc:
        if exc.source != source:
            return "bug", f"error does not name the source: {exc}"
        return "rejected", exc.problem
    except BaseException as exc:  # noqa: BLE001 - anything else is a bug
        return "bug", f"{type(exc).__name__}: {exc} | " + " ".join(traceback.format_exception(exc)[-3:])


def worker(seed: int, cases: int) -> dict:
    """Mutate, then parse from both sources: bytes in memory and the same bytes
    as a file (``container.read``); both must reject or both must give the
    same checkpoint."""
    import resource
    import tempfile

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    from rkckpt import container

    seeds = _seeds()
    rng = random.Random(seed)
    stats = {
        "cases": 0,
        "rejected": 0,
        "parsed": 0,
        "failures": [],
        "bombs": _bombs(),
        "readers": 2,
    }
    tmpdir = tempfile.TemporaryDirectory(prefix="rkckpt-fuzz-")
    path = os.path.join(tmpdir.name, "case.rkcp")
    for case in range(cases):
        name, raw = seeds[case % len(seeds)]
        buf, how = _mutate(rng, raw)
        data = bytes(buf)
        stats["cases"] += 1
        fail = {"case": case, "seed": name, "mutation": how}
        kind, res = _outcome(lambda b: container.read(b, path), data, path)
        with open(path, "wb") as f:
            f.write(data)
        kind2, res2 = _outcome(container.read, path, path)
        if "bug" in (kind, kind2):
            stats["failures"].append({**fail, "error": f"memory: {res}" if kind == "bug" else f"file: {res2}"})
            continue
        if kind != kind2:
            stats["failures"].append(
                {
                    **fail,
                    "error": f"readers disagree: memory {kind} ({res if kind != 'ok' else ''}), file {kind2} ({res2 if kind2 != 'ok' else ''})",
                }
            )
            continue
        if kind == "rejected":
            stats["rejected"] += 1
            continue
        try:
            _check_parse(res, data)
            _check_parse(res2, data)
            assert res2.checkpoint.content_digest() == res.checkpoint.content_digest(), "readers give different content"
            assert res2.checkpoint.metadata == res.checkpoint.metadata, "readers give different metadata"
            stats["parsed"] += 1
        except Exception as exc:  # noqa: BLE001 - an assertion or a re-encoding failure
            stats["failures"].append({**fail, "error": f"bad parse: {type(exc).__name__}: {exc}"})
    tmpdir.cleanup()
    return stats


@pytest.mark.timeout(180)
def test_fuzz_parser():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(SEED), str(CASES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["cases"] == CASES
    assert not stats["failures"], json.dumps(stats["failures"][:10], indent=1)
    assert not [b for b in stats["bombs"] if "FAILED" in b], stats["bombs"]
    # the mutations reach both outcomes, so the deeper parser really ran
    assert stats["rejected"] > CASES // 2
    assert stats["parsed"] > 0


def _read_every_way(path: str, ck: object) -> None:
    """The CLI's path (probe, then read), a region read and the deep check; the content must be ``ck``'s."""
    from rkckpt import container, hdf5

    hdf5.probe(path)
    got = container.read(path).checkpoint
    hdf5.read_region(path, "velocity")
    hdf5.check_h5(path)
    assert got.content_digest() == ck.content_digest(), "a damaged file read as different content"  # type: ignore[attr-defined]


def h5_worker(seed: int, cases: int) -> dict:
    """Damage the HDF5 container itself; the CLI's path (probe, then read) must
    end every case in a CheckpointError or a correct read."""
    import tempfile

    from ckpt_helpers import sample_checkpoint
    from hostile_inputs import try_reader
    from rkckpt import codec, hdf5

    tmp = tempfile.TemporaryDirectory(prefix="rkckpt-h5fuzz-")
    base = os.path.join(tmp.name, "base.rk.h5")
    ck = sample_checkpoint(n=512)
    hdf5.write_h5(base, ck, codec.COMPAT)
    raw = open(base, "rb").read()
    rng = random.Random(seed)
    stats = {"cases": 0, "rejected": 0, "ok": 0, "failures": []}
    path = os.path.join(tmp.name, "case.rk.h5")
    for case in range(cases):
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        if rng.random() < 0.2:
            del buf[rng.randrange(len(buf)) :]
        with open(path, "wb") as f:
            f.write(buf)
        stats["cases"] += 1
        outcome = try_reader(lambda p: _read_every_way(p, ck), path)
        stats["ok"] += outcome.read
        stats["rejected"] += outcome.refused
        if outcome.bug is not None:
            stats["failures"].append({"case": case, "error": outcome.bug})
    tmp.cleanup()
    return stats


@pytest.mark.timeout(180)
def test_fuzz_hdf5_container():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))  # tests/ for helpers
    proc = subprocess.run([sys.executable, __file__, "--h5worker", str(SEED), "200"], capture_output=True, text=True, env=env, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["cases"] == 200
    assert not stats["failures"], stats["failures"][:10]
    assert stats["rejected"] > 0


def test_memory_limit_is_enforced():
    """The child's RLIMIT_AS really stops a huge allocation (guards the fuzz test)."""
    code = (
        f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
        "try:\n    bytearray(3 << 30)\nexcept MemoryError:\n    print('limited')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "limited"


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    print(json.dumps(worker(int(sys.argv[2]), int(sys.argv[3]))))
if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--h5worker":
    print(json.dumps(h5_worker(int(sys.argv[2]), int(sys.argv[3]))))
