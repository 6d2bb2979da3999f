"""Node-local first, shared store later: fast saves that become durable.

A save lands in the fast local folder (atomic, fsynced) and returns; a
background thread then copies it to the shared/object store. A checkpoint
is only *durable* once that copy has finished, which ``durable(name)`` and
``flush()`` expose. Reads prefer the local copy (complete by construction,
because local saves are atomic) and fall back to the shared one, so a job
restarted on another node still finds its state. Deletes (retention) go
through the same queue behind the uploads (both copies are removed there)
and are held back while any upload has failed, so the shared copy never
loses an old chain before the newer one has arrived.

Each checkpoint saved node-locally is also noted at once in the shared store
(``rkckpt.node-local.json``: name, step, node), before its upload. A run that
opens the same store on another node (the first node died) compares that
note with what reached the store and says in its log what was lost: nothing,
or the checkpoints that never left the dead node.

**Commit records go to the shared store last.** A coordinated checkpoint set
(``rkckpt.ckptset``) is committed by a manifest naming its parts. The rule,
so that the shared store never holds a manifest whose parts are not all
there (a node lost after the commit must still leave a whole set):

* a rank reports its part durable only when ``durable(name)`` holds for
  every file of the part's chain, i.e. the shared store has them (not when
  the node-local save returned);
* ``ckptset.commit_set`` waits for this process's uploads of the parts'
  chains (``wait_uploaded``: not for newer saves queued behind them), checks
  ``durable`` for every file, and only then saves the manifest (node-local,
  then uploaded behind everything before it in this queue) and waits for it;
* there is no node-local-only commit: a same-node restore reads the local
  copies of a set the shared store already has.

``durable(name)`` is true once this process uploaded ``name``, or, for a
name it never saved (another rank's part, an earlier run's file), once the
shared store has it (asked once, remembered). An upload that failed is
retried by ``retry()`` (non-blocking) or ``flush()``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .base import ExistsError, ListingError, Payload, Storage, StorageBase, StorageError, validate_name
from .file import FileStorage

log = logging.getLogger(__name__)

_STOP = object()
#: the newest checkpoint saved node-locally, noted in the shared store before its upload
JOURNAL = "rkckpt.node-local.json"


def _node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _newest_step(names: Iterable[str]) -> int | None:
    from ..chain import newest_named_step  # rkckpt.chain imports this package

    return newest_named_step(names)


def _newest_chained_step(shared: Storage, noted: str) -> int | None:
    """Newest step in ``shared`` of the noted file's kernel whose chain back to a full file is complete.

    Read from the files' headers (not from names alone), so a delta whose
    parent never arrived does not count as what survived.
    """
    from ..chain import NAME_RE, ChainIndex  # rkckpt.chain imports this package

    m = NAME_RE.match(noted)
    if m is None:
        return None
    index = ChainIndex(shared)
    index.refresh()
    for e in reversed(index.sorted(m["kernel_id"])):
        if index.chain_of(e)[1] is None:
            return e.step
    return None


class TwoLevelStorage(StorageBase):
    def __init__(self, local: FileStorage, shared: Storage) -> None:
        self.local = local
        self.shared = shared
        self.url = f"{local.url} -> {shared.url}"
        self._cond = threading.Condition()
        self._ops: deque[object] = deque()  # (op, name) in upload order, under _cond; ``expedite`` reorders
        self._pending: dict[str, int] = {}  # name -> outstanding operations
        self._failed: dict[str, str] = {}  # name -> last error (upload still owed)
        self._durable: set[str] = set()
        self.flushed_bytes = 0
        self.flush_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="rkckpt-flush", daemon=True)
        self._thread.start()
        self._report_unflushed()

    def _report_unflushed(self) -> None:
        """Log what an earlier run saved node-locally and whether it reached the shared store."""
        try:
            doc = json.loads(self.shared.load(JOURNAL))
            name, step, node = str(doc["name"]), int(doc["step"]), str(doc.get("node", "?"))
            if _newest_step([name]) != step:  # the note contradicts itself: it says nothing reliable
                raise ValueError(f"the note names {name!r} but says step {step}")
            if self.local.exists(name):
                return  # same node (or folder): that checkpoint is right here
            if self.shared.exists(name):
                log.info(
                    "the previous run (node %s) saved up to checkpoint step %d and it reached %s: none of its checkpoints is lost",
                    node,
                    step,
                    self.shared.url,
                )
                return
            durable = _newest_chained_step(self.shared, name)
            if durable is not None and durable >= step:
                # a stale note (a later run wrote on, retention removed the noted file): nothing is missing
                log.info(
                    "the previous run's note (node %s, checkpoint step %d) is older than the newest restorable checkpoint "
                    "in %s (step %d): none of its checkpoints is lost",
                    node,
                    step,
                    self.shared.url,
                    durable,
                )
                return
            log.warning(
                "the previous run (node %s) saved checkpoint step %d node-locally but it never reached %s (the node failed "
                "before the upload): the newest checkpoint there is step %d, so %d steps are lost and computed again",
                node,
                step,
                self.shared.url,
                durable or 0,
                step - (durable or 0),
            )
        except Exception as exc:  # noqa: BLE001 - a report only; no journal is the normal first run
            log.debug("no node-local journal in %s: %s", self.shared.url, exc)

    def _note_local_save(self, name: str) -> None:
        step = _newest_step([name])
        if step is None:
            return
        doc = {"name": name, "step": step, "node": _node(), "time": round(time.time(), 3)}
        try:
            self.shared.save(JOURNAL, json.dumps(doc).encode())
        except Exception as exc:  # noqa: BLE001 - the checkpoint itself is saved; the note is a courtesy
            log.debug("cannot note %s in %s: %s", name, self.shared.url, exc)

    # ---------------------------------------------------------------- background
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ops:
                    self._cond.wait()
                item = self._ops.popleft()
            if item is _STOP:
                return
            op, name = item  # type: ignore[misc]
            try:
                if op == "put":
                    if self.local.exists(name):
                        t0 = time.perf_counter()
                        put_local = getattr(self.shared, "put_local", None)
                        if put_local is not None:
                            n = put_local(self.local.path(name), name)
                        else:
                            n = self.shared.save(name, lambda f, name=name: self.local.copy_to(name, f))
                        self.flush_seconds += time.perf_counter() - t0
                        self.flushed_bytes += n
                        with self._cond:
                            self._durable.add(name)
                            self._failed.pop(name, None)
                else:
                    with self._cond:
                        owed = [n for n, what in self._failed.items() if what.startswith("put:")]
                    if owed:
                        # never thin out the shared copy while newer saves have not reached it
                        raise StorageError(self.shared.url, f"delete deferred: {len(owed)} newer object(s) not yet uploaded")
                    self.shared.delete(name)
                    self.local.delete(name)  # only now: a queued upload may still need it
                    with self._cond:
                        self._failed.pop(name, None)
                        self._durable.discard(name)
            except Exception as exc:  # noqa: BLE001 - recorded, retried by flush()
                log.warning("flushing %s to %s failed: %s", name, self.shared.url, exc)
                with self._cond:
                    self._failed[name] = f"{op}:{exc}"
            finally:
                with self._cond:
                    self._pending[name] -= 1
                    if not self._pending[name]:
                        del self._pending[name]
                    self._cond.notify_all()

    def _enqueue(self, op: str, name: str) -> None:
        with self._cond:
            self._pending[name] = self._pending.get(name, 0) + 1
            if op == "put":
                self._durable.discard(name)
            self._ops.append((op, name))
            self._cond.notify_all()

    def expedite(self, names: Iterable[str]) -> None:
        """Move the queued uploads of ``names`` ahead of every other queued operation, in the order given.

        A commit record names parts whose uploads ``commit_set`` has already
        waited for: it need not wait behind the uploads of newer parts queued
        since (an upload already running is not interrupted).
        """
        with self._cond:
            front = [("put", n) for n in names if ("put", n) in self._ops]
            for item in front:
                self._ops.remove(item)
            self._ops.extendleft(reversed(front))

    # ---------------------------------------------------------------- interface
    def acquire_lock(self) -> None:
        self.local.acquire_lock()

    def save(self, name: str, data: Payload) -> int:
        n = self.local.save(name, data)
        self._note_local_save(name)
        self._enqueue("put", name)
        return n

    def create(self, name: str, data: Payload) -> int:
        """``save`` that never replaces a checkpoint, at either level (``ExistsError``).

        The local folder refuses atomically; the shared store is asked first
        (a run on another node may have written the name). A shared store that
        cannot be asked does not stop the local save: node-local saves exist
        to ride out such outages, and the single-writer lock still holds.
        """
        try:
            there = self.shared.exists(name)
        except StorageError as exc:
            log.debug("cannot check %s in %s before saving: %s", name, self.shared.url, exc)
            there = False
        if there:
            raise ExistsError(f"{self.shared.url.rstrip('/')}/{name}", "a checkpoint with this name exists; refusing to replace it")
        n = self.local.create(name, data)
        self._note_local_save(name)
        self._enqueue("put", name)
        return n

    def durable(self, name: str) -> bool:
        """Whether the shared store holds ``name`` (see the module docstring: the commit rule)."""
        with self._cond:
            if name in self._durable:
                return True
            if name in self._pending or name in self._failed:
                return False
        try:
            there = self.shared.exists(name)
        except StorageError:
            return False
        if there:
            with self._cond:
                if name not in self._pending and name not in self._failed:
                    self._durable.add(name)
        return there

    def wait_uploaded(self, names: Iterable[str], timeout: float | None = None) -> None:
        """Wait until no upload of ``names`` is queued or running (not for the uploads queued after them,
        unlike ``flush``); whether each arrived is ``durable``, why not is ``upload_failed``."""
        wanted = set(names)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while wanted & self._pending.keys():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise StorageError(self.shared.url, f"{len(wanted & self._pending.keys())} object(s) still uploading")
                self._cond.wait(left)

    def upload_failed(self, name: str) -> str | None:
        """Why the last upload of ``name`` failed, or None (none failed, or a retry is queued: ``retry``/``flush``)."""
        with self._cond:
            what = None if name in self._pending else self._failed.get(name)
        return what.split(":", 1)[1] if what is not None and what.startswith("put:") else None

    def retry(self) -> int:
        """Queue the failed operations again, uploads before deletes, without waiting; how many."""
        with self._cond:
            owed = [(n, w) for n, w in self._failed.items() if n not in self._pending]
        owed.sort(key=lambda item: not item[1].startswith("put:"))
        for name, what in owed:
            self._enqueue("put" if what.startswith("put:") else "delete", name)
        return len(owed)

    def flush(self, timeout: float | None = None, *, retry: bool = True) -> None:
        """Wait until every save has reached the shared store; raise if one could not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if retry:
            self.retry()
        with self._cond:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise StorageError(self.shared.url, f"flush timed out with {len(self._pending)} object(s) still uploading")
                self._cond.wait(left)
            if self._failed:
                name, what = next(iter(self._failed.items()))
                raise StorageError(self.shared.url, f"{len(self._failed)} object(s) not durable; {name}: {what.split(':', 1)[1]}")

    def local_path(self, name: str) -> Path | None:
        return self.local.local_path(name)

    def _pick(self, name: str) -> Storage:
        validate_name(name)
        return self.local if self.local.exists(name) else self.shared

    def load(self, name: str) -> bytes:
        return self._pick(name).load(name)

    def open_read(self, name: str) -> BinaryIO:
        return self._pick(name).open_read(name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self._pick(name).read_range(name, offset, length)

    def size(self, name: str) -> int:
        return self._pick(name).size(name)

    def list(self) -> list[str]:
        """Both levels. A shared store that cannot be listed is an error, not an empty store:
        newer checkpoints from another node may be there."""
        names = set(self.local.list())
        try:
            names.update(self.shared.list())
        except ListingError:
            raise
        except StorageError as exc:
            raise ListingError(exc.source, exc.problem) from None
        return sorted(names)

    def delete(self, name: str) -> None:
        """Queued behind earlier uploads; removes the shared copy, then the local one."""
        validate_name(name)
        self._enqueue("delete", name)

    def exists(self, name: str) -> bool:
        if self.local.exists(name):
            return True
        return self.shared.exists(name)

    def close(self) -> None:
        if self._thread.is_alive():
            with self._cond:
                self._ops.append(_STOP)
                self._cond.notify_all()
            self._thread.join(timeout=60)
        self.local.close()
        self.shared.close()

    def __repr__(self) -> str:
        return f"TwoLevelStorage({self.local!r}, {self.shared!r})"
