"""Two-level storage states what a node failure lost: the journal of node-local saves
(``rkckpt.node-local.json`` in the shared store) against what reached the store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rkckpt.storage import FileStorage, MemoryStorage, StorageError, TwoLevelStorage
from rkckpt.storage.twolevel import JOURNAL


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
    a.save("k-000000000100-full.rkcp", b"one")
    a.flush()
    shared.cut = True
    a.save("k-000000000200-delta.rkcp", b"two")
    a.save("k-000000000300-delta.rkcp", b"three")
    with pytest.raises(StorageError):
        a.flush(timeout=10, retry=False)
    note = json.loads(shared.load(JOURNAL))
    assert (note["name"], note["step"], note["node"]) == ("k-000000000300-delta.rkcp", 300, "n1")
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
