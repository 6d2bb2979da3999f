"""Block-level deltas: size follows the change, chains check digests at every link."""

from __future__ import annotations

import numpy as np
import pytest

from rkckpt import CheckpointError, DeltaMismatchError, codec, container, delta
from rkckpt.delta import STATE_DIGEST_KEY, apply_chain, apply_delta, apply_patch, make_delta, make_patch
from rkckpt.flags import CHUNK_BLOCK_DELTA, HDR_BLOCK_DELTA
from rkckpt.model import PARENT_DIGEST_KEY, Checkpoint, Metadata

N = 1 << 20  # floats per region


def _state(step: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> Checkpoint:
    ck = Checkpoint(Metadata("k", "fdtd_3d", step), created_at=step)
    for name, arr in (("a", a), ("b", b), ("c", c)):
        ck.add_region(name, arr)
    return ck


def _base():
    rng = np.random.default_rng(3)
    return [rng.random(N).astype(np.float32) for _ in range(3)]


def test_block_delta_size_follows_changed_bytes(tmp_path):
    a, b, c = _base()
    parent = _state(1, a, b, c)
    b2 = b.copy()
    b2[1000 : 1000 + N // 20] += 1.0  # 5 % of one region, in one place
    child = _state(2, a, b2, c)
    d = make_delta(parent, child, mode="block")
    assert len(d.chunks) == 1 and d.chunks[0].flags == CHUNK_BLOCK_DELTA
    assert d.chunks[0].size <= 0.06 * b.nbytes
    assert d.metadata.custom[PARENT_DIGEST_KEY] == parent.content_digest()
    assert d.metadata.custom[STATE_DIGEST_KEY] == child.content_digest()
    p = tmp_path / "d.rkcp"
    n = container.write(p, d, codec.WriteOptions())
    assert n <= 0.06 * b.nbytes
    parsed = container.read(p)
    assert parsed.header.flags & HDR_BLOCK_DELTA
    got = apply_delta(parent, parsed.checkpoint)
    assert got.content_digest() == child.content_digest()
    np.testing.assert_array_equal(got.region("b"), b2)
    assert all(ch.flags == 0 for ch in got.chunks)


def test_whole_mode_is_reference_compatible(vectors_dir):
    full = container.read(vectors_dir / "full_step1000.rkcp").checkpoint
    d1 = container.read(vectors_dir / "delta_step1010.rkcp").checkpoint
    child = apply_delta(full, d1)
    again = make_delta(full, child, mode="whole")
    assert [c.identity for c in again.chunks] == [c.identity for c in d1.chunks]
    assert STATE_DIGEST_KEY not in again.metadata.custom
    assert container.encode(again, codec.COMPAT) == (vectors_dir / "delta_step1010.rkcp").read_bytes()


def test_compat_refuses_block_patches():
    a, b, c = _base()
    b2 = b.copy()
    b2[:10] = 0
    d = make_delta(_state(1, a, b, c), _state(2, a, b2, c), mode="block")
    with pytest.raises(CheckpointError, match="compat mode"):
        container.encode(d, codec.COMPAT)


def test_wrong_parent_and_corrupt_patch():
    a, b, c = _base()
    s0 = _state(1, a, b, c)
    b1 = b.copy()
    b1[5] = 7
    s1 = _state(2, a, b1, c)
    b2 = b1.copy()
    b2[-3] = 9
    s2 = _state(3, a, b2, c)
    d1, d2 = make_delta(s0, s1, mode="block"), make_delta(s1, s2, mode="block")
    with pytest.raises(DeltaMismatchError, match="parent digest"):
        apply_delta(s0, d2)
    assert apply_chain(s0, [d1, d2]).content_digest() == s2.content_digest()
    # a patch that parses but was altered: the recorded state digest catches it
    bad = bytearray(d1.chunks[0].data)
    bad[-1] ^= 1
    d1.chunks[0].data = bytes(bad)
    with pytest.raises(CheckpointError, match="state digest"):
        apply_delta(s0, d1)
    with pytest.raises(DeltaMismatchError, match="parent chunk of 16 bytes"):
        apply_patch(bytes(8), make_patch(bytes(16), b"x" * 16))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda p: p[:10], "shorter than its header"),
        (lambda p: b"XXXX" + p[4:], "bad magic"),
        (lambda p: p[:24] + (10**6).to_bytes(4, "little") + p[28:], "declares 1000000 runs"),
        (lambda p: p + b"extra", "data bytes"),
    ],
)
def test_malformed_patches(mutate, match):
    old = bytes(10_000)
    new = bytearray(old)
    new[5000:5100] = b"z" * 100
    patch = make_patch(old, bytes(new))
    with pytest.raises(CheckpointError, match=match):
        apply_patch(old, mutate(patch), "p")


def test_growing_shrinking_and_identical_chunks():
    old = np.arange(10_000, dtype=np.uint8)
    assert make_patch(old.data, old.data) is None
    for new in (old[:5000], np.concatenate([old, np.ones(9000, np.uint8)]), old[:4096], np.zeros(0, np.uint8)):
        patch = make_patch(old.data, new.data, 4096)
        assert bytes(apply_patch(old.data, patch)) == new.tobytes()
    # growing past the parent with no data for the new bytes is refused
    patch = make_patch(old.data, old[:5000].data, 4096)
    forged = patch[:16] + (20_000).to_bytes(8, "little") + patch[24:]
    with pytest.raises(CheckpointError):
        apply_patch(old.data, forged)


@pytest.mark.parametrize("block", [1, 3, 8, 32, 64, 128, 512, 100])
def test_changed_blocks_matches_a_block_by_block_compare(block: int) -> None:
    """The word-at-a-time compare (eight flags of a 64-byte block read as one uint64) flags exactly the blocks that differ."""
    rng = np.random.default_rng(block)
    a = rng.integers(0, 255, 70_001, dtype=np.uint8)
    for frac in (0.0, 0.0005, 0.3):
        b = a.copy()
        b[rng.random(a.size) < frac] ^= 1
        for old in (a, a[:-150], np.concatenate([a, a[:5]])):  # same size, a shorter parent, a longer one
            got = delta.changed_blocks(old, b, block)
            nb = -(-b.size // block)
            ends = [min(b.size, (i + 1) * block) for i in range(nb)]
            want = [old.size < e or not np.array_equal(old[i * block : e], b[i * block : e]) for i, e in enumerate(ends)]
            assert got.tolist() == want
