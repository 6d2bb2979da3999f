"""Property tests: random chunk sets and delta chains round-trip, compat and extended."""

from __future__ import annotations

import io as pyio

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkckpt import codec, container
from rkckpt.delta import apply_chain, make_delta
from rkckpt.model import Checkpoint, Chunk, Metadata

TYPES = st.sampled_from([1, 2, 4, 5, 5, 5, 100, 100, 77])
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _data(draw, size: int) -> bytes:
    kind = draw(st.sampled_from(["zeros", "wave", "noise", "ints"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "zeros":
        return bytes(size)
    if kind == "noise":
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    if kind == "ints":
        return rng.integers(0, 3, size, dtype=np.uint8).tobytes()
    return np.sin(np.linspace(0, 40, size // 4 + 1, dtype=np.float32)).astype(np.float32).tobytes()[:size]


@st.composite
def checkpoints(draw) -> Checkpoint:
    custom = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    meta = Metadata(draw(st.text(max_size=10)), "fdtd_3d", draw(st.integers(0, 2**64 - 1)), custom=custom)
    ck = Checkpoint(meta, created_at=draw(st.integers(0, 2**63)))
    seen = set()
    for _ in range(draw(st.integers(0, 6))):
        ctype = draw(TYPES)
        cid = draw(st.integers(0, 2**64 - 1)) if ctype in (5, 100) else draw(st.integers(0, 2**64 - 1))
        c = Chunk(ctype, cid, _data(draw, draw(st.sampled_from([0, 1, 3, 100, 4096, 5000, 70_000]))))
        if c.identity not in seen:
            seen.add(c.identity)
            ck.chunks.append(c)
    return ck


OPTIONS = st.builds(
    codec.WriteOptions,
    compat=st.booleans(),
    level=st.sampled_from([1, 3]),
    shuffle=st.booleans(),
    threads=st.sampled_from([0, 1, 2]),
    block_size=st.sampled_from([4096, 8192, 65536]),
    min_ratio=st.sampled_from([0.0, 0.5, 1.0]),
    adaptive=st.sampled_from(["speed", "size"]),
)


@SETTINGS
@given(checkpoints(), OPTIONS)
def test_roundtrip(ck, options):
    blob = container.encode(ck, options)
    parsed = container.read(blob, "mem")
    assert parsed.checkpoint.content_digest() == ck.content_digest()
    assert parsed.checkpoint.metadata == ck.metadata
    assert [bytes(c.data) for c in parsed.checkpoint.chunks] == [bytes(c.data) for c in ck.chunks]
    buf = pyio.BytesIO()
    container.write(buf, ck, options)
    assert buf.getvalue() == blob
    if options.compat:
        assert parsed.header.compression == 0 and parsed.header.flags == 0
        assert all(h.flags == 0 for h in parsed.chunk_headers)


@st.composite
def chains(draw):
    base = draw(checkpoints())
    states = [base]
    for _ in range(draw(st.integers(1, 6))):
        prev = states[-1]
        chunks = []
        for c in prev.chunks:
            action = draw(st.sampled_from(["keep", "keep", "poke", "resize", "replace"]))
            data = bytearray(c.data)
            if action == "poke" and data:
                i = draw(st.integers(0, len(data) - 1))
                data[i : i + draw(st.integers(1, 9000))] = bytes([draw(st.integers(0, 255))]) * min(9000, len(data) - i)
            elif action == "resize":
                data = data[: draw(st.integers(0, len(data)))] + bytes(draw(st.integers(0, 5000)))
            elif action == "replace":
                data = bytearray(_data(draw, len(data)))
            chunks.append(Chunk(c.chunk_type, c.chunk_id, bytes(data)))
        if draw(st.booleans()):
            new = Chunk(100, draw(st.integers(0, 2**64 - 1)), _data(draw, draw(st.sampled_from([0, 10, 9000]))))
            if new.identity not in {c.identity for c in chunks}:
                chunks.append(new)
        states.append(Checkpoint(Metadata("k", "t", (prev.metadata.current_step + 1) % 2**64), chunks, created_at=1))
    return states, draw(st.sampled_from(["block", "whole"])), draw(OPTIONS)


@SETTINGS
@given(chains())
def test_delta_chains(arg):
    states, mode, options = arg
    if options.compat:
        mode = "whole"
    deltas = []
    for parent, child in zip(states, states[1:], strict=False):
        d = make_delta(parent, child, mode=mode)
        deltas.append(container.read(container.encode(d, options), "d").checkpoint)
    base = container.read(container.encode(states[0], options), "b").checkpoint
    got = apply_chain(base, deltas)
    assert got.content_digest() == states[-1].content_digest()
    assert [bytes(c.data) for c in got.chunks] == [bytes(c.data) for c in states[-1].chunks]


@SETTINGS
@given(
    st.binary(max_size=20_000) | st.builds(lambda n, v: bytes([v]) * n, st.integers(0, 70_000), st.integers(0, 255)),
    st.integers(0, 16),
    st.integers(1, 3).map(lambda k: 4096 * k),
    st.booleans(),
)
def test_codec_payload_roundtrip(data, elem, block, delta_flag):
    flags = 4 if delta_flag else 0  # CHUNK_BLOCK_DELTA is a logical flag and must survive
    opts = codec.WriteOptions(adaptive="size", min_ratio=1.0, block_size=block)
    stored, payload = codec.encode_payload(data, flags, opts, elem_size=elem)
    assert stored & 4 == flags
    out = codec.decode_payload(stored, memoryview(payload), len(data), "p")
    assert bytes(out) == data
    assert codec.logical_flags(stored) == flags
