from __future__ import annotations

import json

import pytest

from rkckpt import CheckpointError, container
from rkckpt.delta import apply_delta
from rkckpt.siphash import region_id


def test_name_ids_match_reference(vectors_dir):
    manifest = json.loads((vectors_dir / "manifest.json").read_text())
    for name, cid in manifest["name_ids"].items():
        assert region_id(name) == int(cid), name


@pytest.mark.parametrize("name", ["full_step1000", "delta_step1010", "delta_step1020"])
def test_reencode_is_byte_identical(vectors_dir, name):
    raw = (vectors_dir / f"{name}.rkcp").read_bytes()
    parsed = container.read(raw, name)
    assert container.encode(parsed.checkpoint) == raw


def test_chain_digests(vectors_dir):
    manifest = json.loads((vectors_dir / "manifest.json").read_text())
    full, d1, d2 = (container.read(vectors_dir / f"{n}.rkcp").checkpoint for n in ("full_step1000", "delta_step1010", "delta_step1020"))
    a1 = apply_delta(full, d1)
    assert a1.content_digest() == manifest["applied_1010"]["content_digest"]
    assert apply_delta(a1, d2).content_digest() == manifest["applied_1020"]["content_digest"]
    with pytest.raises(CheckpointError, match="parent digest"):
        apply_delta(full, d2)
