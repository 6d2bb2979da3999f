"""The writer's per-checkpoint shortcuts give exactly what the plain ways gave.

lookup3 (unrolled and memoised) against the reference steps, Bob Jenkins'
published values and libhdf5's own checksums; the index file (encoded entry
by entry, lines cached) against ``json``/``asdict``, after many writes and
after a writer killed between writes; the word-wise change estimate is
covered in ``test_checkpoint_overlap``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict

import h5py
import numpy as np
import pytest

from helpers import PLUGIN
from rkckpt import h5layout, h5write
from rkckpt import manager as manager_mod
from rkckpt.chain import INDEX_NAME, ChainIndex, Entry, encode_index, latest_restorable
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Metadata
from rkckpt.storage import FileStorage


def test_lookup3_matches_the_reference_steps_on_random_blocks() -> None:
    rng = np.random.default_rng(3)
    for n in [*range(40), 44, 46, 264, 768, 1000, 4099]:
        for initval in (0, 1, 0xDEADBEEF):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            want = h5layout.lookup3_reference(data, initval)
            assert h5layout.lookup3(data, initval) == want
            assert h5layout.lookup3(bytearray(data), initval) == want  # the memo's answer, from another type
            assert h5layout.lookup3(memoryview(data), initval) == want


def test_lookup3_published_values() -> None:
    """Bob Jenkins' own test values of ``hashlittle`` (lookup3.c, driver5)."""
    assert h5layout.lookup3(b"", 0) == 0xDEADBEEF
    assert h5layout.lookup3(b"Four score and seven years ago", 0) == 0x17770551
    assert h5layout.lookup3(b"Four score and seven years ago", 1) == 0xCD628161


def test_lookup3_memo_is_bounded_and_keyed_by_content() -> None:
    a = bytearray(b"x" * 100)
    first = h5layout.lookup3(a)
    a[50] ^= 1  # the same object with other bytes: never the memoised answer
    assert h5layout.lookup3(a) == h5layout.lookup3_reference(bytes(a)) != first
    for i in range(3 * h5layout._MEMO_MAX):
        h5layout.lookup3(i.to_bytes(8, "little"))
    assert len(h5layout._MEMO) <= h5layout._MEMO_MAX


def test_lookup3_is_libhdf5s_checksum(tmp_path) -> None:
    """A file libhdf5 wrote: its version-2 superblock ends with lookup3 of the 44 bytes before."""
    path = tmp_path / "x.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["a"] = 1
    raw = path.read_bytes()
    assert raw[8] in (2, 3)
    assert h5layout.lookup3(raw[:44]) == int.from_bytes(raw[44:48], "little")


def _entries(n: int) -> dict[str, Entry]:
    out = {}
    for i in range(n):
        kind = "full" if i % 3 == 0 else "delta"
        name = f'k"é-{i:012d}-{kind}.rk.h5'
        out[name] = Entry(name, 'k"é', i, kind, 100 + i, f"{i:08x}", None if kind == "full" else f"{i - 1:08x}", i * 7, None)
    return out


def test_index_document_is_what_json_and_asdict_gave() -> None:
    entries = _entries(30)
    lines: dict = {}
    for _ in range(3):  # a fresh cache, then cached lines, then after a change
        got = json.loads(encode_index(entries, lines))
        assert got == {"version": 1, "entries": {n: asdict(e) for n, e in sorted(entries.items())}}
        next(iter(entries.values())).error = "damaged"
        entries.pop(sorted(entries)[-1])
    assert len(lines) == len(entries) + 1  # only the entries of the last save are cached
    assert json.loads(encode_index({})) == {"version": 1, "entries": {}}
    e = next(iter(entries.values()))
    e.note = "not a field"  # type: ignore[attr-defined]
    assert json.loads(encode_index(entries, lines))["entries"][e.name] == asdict(e)


def _state(step: int) -> Checkpoint:
    c = Checkpoint(Metadata("k", "t", step))
    c.add_region("x", np.full(4096, step, dtype=np.float32))
    return c


def test_index_stays_right_over_many_writes(tmp_path) -> None:
    policy = CheckpointPolicy(every_steps=1, keep_chains=None, full_every=3)
    with CheckpointManager(tmp_path, policy, "k") as m:
        for step in range(1, 41):
            m.final(SnapshotResponse(SnapshotRequest(step), _state(step)))
    saved = json.loads((tmp_path / INDEX_NAME).read_text())["entries"]
    fresh = ChainIndex(FileStorage(tmp_path))
    fresh.refresh(trust_cache=False)  # every header read from the files
    headers = {n: {**asdict(e), "checksum": None} for n, e in fresh.entries.items()}  # the writer does not record it
    assert saved == headers
    assert len(saved) == 40


def test_index_after_a_writer_killed_between_writes(tmp_path) -> None:
    """SIGKILL after a checkpoint: the index may lag its files, never hide one; the restore is the newest file."""
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(PLUGIN)!r})
        import numpy as np
        from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
        from rkckpt.model import Checkpoint, Metadata
        m = CheckpointManager({str(tmp_path)!r}, CheckpointPolicy(every_steps=1, full_every=2), "k")
        for step in range(1, 6):
            c = Checkpoint(Metadata("k", "t", step))
            c.add_region("x", np.full(4096, step, dtype=np.float32))
            m.final(SnapshotResponse(SnapshotRequest(step), c))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    index = ChainIndex(FileStorage(tmp_path))
    rp = latest_restorable(FileStorage(tmp_path), "k", index=index)
    assert rp is not None and rp.step == 5
    assert np.array_equal(rp.checkpoint.region("x"), _state(5).region("x"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".rkckpt-tmp-")]


@pytest.mark.parametrize("fmt", ["rk.h5", "rkcp"])
def test_warm_up_thread_from_the_first_due_only_for_the_hdf5_form(tmp_path, fmt, monkeypatch) -> None:
    monkeypatch.setattr(h5write, "_warm", False)
    m = CheckpointManager(tmp_path, CheckpointPolicy(checkpoint_format=fmt), "k")
    assert m._warm is None  # not before the run loop asks (a restore runs alone)
    m.due(0)
    assert (m._warm is not None) == (fmt == "rk.h5")
    m.due(1)  # once
    m.final(SnapshotResponse(SnapshotRequest(1), _state(1)))  # a write racing the warm-up is fine
    m.close()
    assert h5write.is_warm() == (fmt == "rk.h5")
    rp = latest_restorable(FileStorage(tmp_path), "k")
    assert rp is not None and rp.step == 1


def _saved_steps(folder) -> set[int]:
    if not (folder / INDEX_NAME).exists():
        return set()
    return {e["step"] for e in json.loads((folder / INDEX_NAME).read_text())["entries"].values()}


def test_index_saves_are_spaced_and_flushed(tmp_path, monkeypatch) -> None:
    """Writes within ``INDEX_SAVE_SECONDS`` of an index save leave it behind; a lagging index hides nothing; flush saves it."""
    monkeypatch.setattr(manager_mod, "INDEX_SAVE_SECONDS", 1e9)  # never due again after the first save
    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1, keep_chains=None), "k") as m:
        m.submit(SnapshotResponse(SnapshotRequest(1), _state(1)))
        m.wait()
        assert _saved_steps(tmp_path) == {1}
        for step in (2, 3):
            m.submit(SnapshotResponse(SnapshotRequest(step), _state(step)))
        m.wait()
        assert _saved_steps(tmp_path) == {1}
        rp = latest_restorable(FileStorage(tmp_path), "k")  # what a restore after a crash now would find
        assert rp is not None and rp.step == 3
        m.flush()
        assert _saved_steps(tmp_path) == {1, 2, 3}
        m.submit(SnapshotResponse(SnapshotRequest(4), _state(4)))
        m.wait()
        assert _saved_steps(tmp_path) == {1, 2, 3}
    assert _saved_steps(tmp_path) == {1, 2, 3, 4}  # close saved it
    monkeypatch.setattr(manager_mod, "INDEX_SAVE_SECONDS", 0.0)
    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1, keep_chains=None), "k") as m:
        m.submit(SnapshotResponse(SnapshotRequest(5), _state(5)))
        m.wait()
        assert _saved_steps(tmp_path) == {1, 2, 3, 4, 5}


def _big_state(step: int) -> Checkpoint:
    """Payloads over the inline CRC limit (64 KiB), so the helper thread does the CRCs."""
    c = Checkpoint(Metadata("crc", "test", step))
    c.add_region("a", np.arange(1 << 16, dtype=np.float64) * step)
    return c


def _round_trip(step: int) -> bool:
    import io

    from rkckpt import stream
    from rkckpt.source import MemorySource

    buf = io.BytesIO()
    stream.write_to(buf, _big_state(step))
    got = stream.read_source(MemorySource(buf.getvalue())).checkpoint
    return got.region("a").tobytes() == _big_state(step).region("a").tobytes()


def _crc_helpers() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("rkckpt-crc")]


def test_crc_helper_is_one_per_calling_thread_and_goes_with_it() -> None:
    """Streams written and read in one thread share one helper (no thread started per stream); a thread's helper
    exits once the thread has ended; a forked child gets a helper of its own (the parent's worker is not there)."""
    import gc
    import threading

    from helpers import wait_until

    assert _round_trip(1)
    mine = set(_crc_helpers())
    assert mine  # kept after the stream, for the next one
    for step in range(2, 6):
        assert _round_trip(step)
    assert set(_crc_helpers()) == mine  # reused, none added

    def other() -> None:
        assert _round_trip(7)
        seen.append(set(_crc_helpers()) - mine)

    seen: list[set] = []
    t = threading.Thread(target=other)
    t.start()
    t.join(60)
    assert len(seen) == 1 and len(seen[0]) == 1  # the other thread had its own helper
    gc.collect()
    wait_until(lambda: not (set(_crc_helpers()) & seen[0]), 30, "the ended thread's helper to exit")

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a round trip must not wait on the parent's worker, which it does not have
        try:
            os.write(w, b"ok" if _round_trip(9) else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    import select
    import signal

    ready: list = []
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready, "the forked child hung on its CRC helper"
        assert os.read(r, 8) == b"ok"
    finally:
        os.close(r)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
