"""Two-level storage states what a node failure lost: the journal of node-local saves
(``rkckpt.node-local.json`` in the shared store) against what reached the store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from rkckpt import container
from rkckpt.model import PARENT_DIGEST_KEY, Checkpoint, Metadata
from rkckpt.storage import FileStorage, MemoryStorage, StorageError, TwoLevelStorage
from rkckpt.storage.twolevel import JOURNAL


def _ckpt(step: int, parent: str | None = None) -> bytes:
    """A real (small) checkpoint stream: the loss report reads the chain from the files' headers."""
    meta = Metadata("k", "t", step)
    if parent is not None:
        meta = meta.with_custom(**{PARENT_DIGEST_KEY: parent})
    c = Checkpoint(meta)
    c.add_region("a", np.full(16, step, dtype=np.float32))
    return container.encode(c)


class _Cut(MemoryStorage):
    """A shared store whose checkpoint uploads stop arriving once ``cut`` is set
    (the node died before the upload); small notes still get through."""

    cut = False

    def save(self, name, data):  # noqa: ANN001, ANN201
        if self.cut and name.endswith(".rkcp"):
            raise StorageError(name, "node gone")
        return super().save(name, data)


def _open(tmp_path: Path, node: str, shared: MemoryStorage) -> TwoLevelStorage:
    return TwoLevelStorage(FileStorage(tmp_path / node), shared)


def test_node_failure_before_upload_states_the_lost_steps(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    shared = _Cut()
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    a = _open(tmp_path, "n1", shared)
    a.save("k-000000000100-full.rkcp", _ckpt(100))
    a.flush()
    shared.cut = True
    a.save("k-000000000200-full.rkcp", _ckpt(200))
    a.save("k-000000000300-full.rkcp", _ckpt(300))
    with pytest.raises(StorageError):
        a.flush(timeout=10, retry=False)
    note = json.loads(shared.load(JOURNAL))
    assert (note["name"], note["step"], note["node"]) == ("k-000000000300-full.rkcp", 300, "n1")
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    with caplog.at_level(logging.INFO, logger="rkckpt.storage.twolevel"):
        b = _open(tmp_path, "n2", shared)
    b.close()
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "the previous run (node n1) saved checkpoint step 300 node-locally but it never reached" in msg
    assert "the newest checkpoint there is step 100, so 200 steps are lost" in msg
    # the same node (its local folder intact) loses nothing and says nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rkckpt.storage.twolevel"):
        _open(tmp_path, "n1", shared).close()
    assert not [r for r in caplog.records if "previous run" in r.getMessage()]


def test_flushed_saves_lose_nothing_and_say_so(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    shared = MemoryStorage()
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    a = _open(tmp_path, "n1", shared)
    a.save("k-000000000100-full.rkcp", b"one")
    a.save("rkrun.stopped.json", b"{}")  # not a checkpoint: not journalled
    a.flush()
    a.close()
    assert json.loads(shared.load(JOURNAL))["name"] == "k-000000000100-full.rkcp"
    with caplog.at_level(logging.INFO, logger="rkckpt.storage.twolevel"):
        _open(tmp_path, "n2", shared).close()
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "the previous run (node n1) saved up to checkpoint step 100 and it reached" in msg and "none of its checkpoints is lost" in msg


def test_no_or_broken_journal_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shared = MemoryStorage()
    with caplog.at_level(logging.INFO, logger="rkckpt.storage.twolevel"):
        _open(tmp_path, "n1", shared).close()
        shared.save(JOURNAL, b"{not json")
        _open(tmp_path, "n2", shared).close()
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_stale_journal_never_reports_a_negative_loss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 18: a note older than what the store holds (a later run wrote on; retention removed
    the noted file) said "-50 steps are lost". Nothing is lost, and the report says so."""
    shared = MemoryStorage()
    shared.save("k-000000000100-full.rkcp", _ckpt(100))
    shared.save(JOURNAL, json.dumps({"name": "k-000000000050-full.rkcp", "step": 50, "node": "n1"}).encode())
    with caplog.at_level(logging.INFO, logger="rkckpt.storage.twolevel"):
        _open(tmp_path, "n2", shared).close()
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "-50" not in msg and "lost and computed again" not in msg
    assert "older than the newest restorable checkpoint in mem: (step 100): none of its checkpoints is lost" in msg


def test_journal_loss_is_counted_against_the_chain_not_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A delta whose parent never arrived is not what survived: the loss runs back to the newest
    complete chain (step 100), not to the orphan's name (step 250)."""
    shared = MemoryStorage()
    shared.save("k-000000000100-full.rkcp", _ckpt(100))
    shared.save("k-000000000250-delta.rkcp", _ckpt(250, parent="0" * 64))
    shared.save(JOURNAL, json.dumps({"name": "k-000000000300-delta.rkcp", "step": 300, "node": "n1"}).encode())
    with caplog.at_level(logging.INFO, logger="rkckpt.storage.twolevel"):
        _open(tmp_path, "n2", shared).close()
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "the newest checkpoint there is step 100, so 200 steps are lost" in msg


@pytest.mark.parametrize("step", [-50, 7])
def test_journal_that_contradicts_itself_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture, step: int) -> None:
    shared = MemoryStorage()
    shared.save(JOURNAL, json.dumps({"name": "k-000000000300-delta.rkcp", "step": step, "node": "n1"}).encode())
    with caplog.at_level(logging.INFO, logger="rkckpt.storage.twolevel"):
        _open(tmp_path, "n2", shared).close()
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "previous run" in r.getMessage()]


def test_durable_means_in_the_shared_store_whoever_uploaded_it(tmp_path: Path) -> None:
    """``durable``: this process's finished upload, or (a name it never saved: another rank's part) the
    shared store has it; a failed upload says why and ``retry`` queues it again without waiting."""
    shared = _Cut()
    a, b = _open(tmp_path, "n1", shared), _open(tmp_path, "n2", shared)
    x, y = "k-000000000100-full.rkcp", "k-000000000200-full.rkcp"
    a.save(x, _ckpt(100))
    a.wait_uploaded([x], timeout=30)
    assert a.durable(x) and b.durable(x) and a.upload_failed(x) is None
    shared.cut = True
    a.save(y, _ckpt(200))
    a.wait_uploaded([y], timeout=30)
    assert not a.durable(y) and not b.durable(y)
    assert a.upload_failed(y) == f"{y}: node gone"
    shared.cut = False
    assert a.retry() == 1
    a.wait_uploaded([y], timeout=30)
    assert a.durable(y) and b.durable(y) and a.upload_failed(y) is None
    a.delete(x)
    a.wait_uploaded([x], timeout=30)
    assert not a.durable(x) and not shared.exists(x)
    a.close()
    b.close()
