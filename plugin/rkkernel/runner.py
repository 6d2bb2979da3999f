"""rkrun's one step loop, for every kernel: restore, batches, checkpoints, signals, result.

A kernel comes in as a plugin (``rkkernel.plugin.KernelPlugin``) and the loop
is the same for all of them. Its phases, each one method of
:class:`StepLoop`: **start** (build the kernel, refuse what cannot work
before any compute), **restore** (newest restorable chain; a chain that
fails to restore is skipped with one warning and the next older one
tried), **advance** (batches; periodic checkpoints in the background;
series samples), then **stop** (a signal: final checkpoint, marker, exit
75; when nothing ran since the restore or the last checkpoint the stop
writes nothing, and the marker names that durable step) or **end** (final checkpoint, atomic result file, exit 0).

Exit codes: 0 done; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 with a final
checkpoint and ``<ckdir>/rkrun.stopped.json`` written — run again to resume;
2 bad input or a checkpoint of another simulation; 1 checkpoint storage
failed where that loses work (a stop that could not write its checkpoint).
A run that completes its steps writes its result even when checkpoints
failed, and says so loudly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rkckpt import hdf5, testhook
from rkckpt.errors import CheckpointError
from rkckpt.manager import CheckpointManager, CheckpointPolicy, RestorePoint, SnapshotRequest, SnapshotResponse
from rkstep.events import EventWriter, NullWriter
from rkstep.mtbi import read_mtbi
from rkstep.protocol import EX_OK, EX_TEMPFAIL, EX_USAGE, STOP_MARKER

from .autointerval import Tuner
from .plugin import KernelPlugin, KernelRun, Series
from .result import write_result
from .runtime import PersistentKernel, RestoreInvalid, RestoreMismatch
from .signals import StopFlag

log = logging.getLogger("rkrun")

MARKER = STOP_MARKER
#: Copies of the state a run holds at once: the device's, the manager's delta
#: parent and the snapshot being written (on a CPU device all in host memory).
STATE_COPIES = 3


@dataclass
class RunConfig:
    """The options every kernel has (see ``plugin.common_options``)."""

    grid: tuple[int, int, int]
    steps: int
    checkpoint_dir: str
    checkpoint_every: int | str | None  # "auto": Young-Daly (rkkernel.autointerval)
    out: str
    backend: str = "auto"
    checkpoint_seconds: float | str | None = None  # "auto" as for checkpoint_every
    checkpoint_format: str = "rk.h5"  # "rkcp": bare RKCKPT files
    full_every: int = 8
    batch: int = 32
    kernel_id: str = "kernel"
    throttle_ms: float = 0.0
    progress: bool | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunConfig:
        g = values["grid"]
        return cls(
            grid=(int(g[0]), int(g[1]), int(g[2])),
            steps=int(values["steps"]),
            checkpoint_dir=str(values["checkpoint_dir"]),
            checkpoint_every=values.get("checkpoint_every"),
            out=str(values["out"]),
            backend=str(values.get("backend") or "auto"),
            checkpoint_seconds=values.get("checkpoint_seconds"),
            checkpoint_format=str(values.get("checkpoint_format") or "rk.h5"),
            full_every=int(values.get("full_every", 8)),
            batch=int(values.get("batch") or 32),
            kernel_id=str(values["kernel_id"]),
            throttle_ms=float(values.get("throttle_ms") or 0.0),
            progress=values.get("progress"),
        )


# ---------------------------------------------------------------- memory
def available_memory() -> tuple[int, str] | None:
    """The tightest of: the address-space limit (``ulimit -v``), the cgroup's limit, MemAvailable."""
    import resource

    found: list[tuple[int, str]] = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _proc_kib("/proc/self/status", "VmSize") * 1024
        found.append((max(0, soft - used), f"the address-space limit (ulimit -v {soft // 1024} KiB)"))
    try:
        raw = open("/sys/fs/cgroup/memory.max").read().strip()  # noqa: SIM115, PTH123
        if raw != "max":
            cur = int(open("/sys/fs/cgroup/memory.current").read())  # noqa: SIM115, PTH123
            found.append((max(0, int(raw) - cur), f"the cgroup memory limit ({int(raw) / 2**30:.1f} GiB)"))
    except (OSError, ValueError):
        pass
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    if avail:
        found.append((avail * 1024, "available memory (MemAvailable)"))
    return min(found) if found else None


def _proc_kib(path: str, key: str) -> int:
    """A ``Key:  N kB`` field of a /proc file (0 when absent or unreadable)."""
    try:
        with open(path) as f:  # noqa: PTH123
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def check_memory(krun: KernelRun) -> str | None:
    """A message when the run cannot fit in memory, before anything is allocated."""
    state = sum(r.nbytes for r in krun.spec.regions)
    need = STATE_COPIES * state
    avail = available_memory()
    if avail is None or need <= avail[0]:
        return None
    g = "x".join(str(n) for n in krun.spec.grid)
    return (
        f"grid {g} does not fit: its state is {state / 2**30:.2f} GiB and a run holds about {STATE_COPIES} copies "
        f"({need / 2**30:.2f} GiB), but {avail[1]} leaves {avail[0] / 2**30:.2f} GiB"
    )


# ---------------------------------------------------------------- helpers
def _write_marker(mgr: CheckpointManager, doc: dict) -> None:
    """Atomically write the "stopped, resume me" marker next to the checkpoints."""
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    try:
        mgr.storage.save(MARKER, data)
        mgr.storage.flush()
    except Exception as exc:  # noqa: BLE001 - the checkpoint itself is what matters
        log.warning("could not write %s to %s: %s", MARKER, mgr.storage.url, exc)


def _clear_marker(mgr: CheckpointManager) -> None:
    try:
        if mgr.storage.exists(MARKER):
            mgr.storage.delete(MARKER)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not remove %s from %s: %s", MARKER, mgr.storage.url, exc)


def describe_chain(rp: RestorePoint) -> str:
    """``full step F + N delta(s)``: what a restore was rebuilt from."""
    from rkckpt.chain import NAME_RE

    m = NAME_RE.match(rp.chain[0]) if rp.chain else None
    full = int(m["step"]) if m else rp.step
    return f"full step {full} + {max(0, len(rp.chain) - 1)} delta(s)"


class _Progress:
    """rich progress bar on a terminal, a log line every ~10% (or 30 s) otherwise."""

    def __init__(self, enabled: bool | None, name: str, start: int, total: int) -> None:
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.total = total
        self.last_pct = -1
        self.last_t = time.monotonic()
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(name),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} steps/s"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("steps", total=total, completed=start, rate=0.0)

    def update(self, step: int, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, rate=rate)
            return
        pct = int(100 * step / max(1, self.total)) // 10 * 10
        now = time.monotonic()
        if pct != self.last_pct or now - self.last_t > 30:
            self.last_pct, self.last_t = pct, now
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info("step %d/%d (%.1f steps/s, eta %.0f s)", step, self.total, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------- the loop
class StepLoop:
    """One run of one kernel; ``run()`` returns the exit status."""

    def __init__(self, plugin: KernelPlugin, values: Mapping[str, Any], stop: StopFlag, events: EventWriter | None = None) -> None:
        self.plugin = plugin
        #: the step's attempt log for the executor (``rkstep.events``)
        self.events = events if events is not None else NullWriter(Path(os.devnull))
        self.reported_step: int | None = None
        self.values = values
        self.cfg = RunConfig.from_values(values)
        self.stop = stop
        self.krun: KernelRun
        self.kernel: PersistentKernel
        self.mgr: CheckpointManager
        self.step = 0
        self.series: dict[str, list[tuple[float, ...]]] = {}
        self.restored: RestorePoint | None = None
        self.done_at: int | None = None
        self.checkpoint_failures: list[str] = []
        #: (step, failed writes before it) of the last periodic checkpoint handed to the manager
        self.submitted: tuple[int, int] | None = None
        #: --checkpoint-every/--checkpoint-seconds auto: measures C and picks the interval
        self.tuner: Tuner | None = None
        #: the stop decision the batch loop took last (one process: a stop signal was seen)
        self.stopping = False

    # ------------------------------------------------------------ start
    def _start(self) -> int | None:
        """Build the kernel and the manager; an exit status when the run cannot start."""
        testhook.fire("start")
        try:
            self.krun = self.plugin.build(self.values)
        except ValueError as exc:
            log.error("%s", exc)
            return EX_USAGE
        problem = check_memory(self.krun)
        if problem:
            log.error("%s", problem)
            return EX_USAGE
        self.series = {s.name: [] for s in self.krun.series}
        # Device runtimes install their own handlers when they load (LLVM in pocl
        # takes SIGUSR1 and SIGTERM): hold the stop signals until ours are back.
        with self.stop.held():
            self.kernel = PersistentKernel(self.krun.spec, self.cfg.backend, kernel_id=self.cfg.kernel_id)
        log.info("backend %s: %s", self.kernel.backend_name, self.kernel.description)
        every, seconds = self.cfg.checkpoint_every, self.cfg.checkpoint_seconds
        if "auto" in (every, seconds):
            m = read_mtbi()
            self.tuner = Tuner(every == "auto", m.seconds, m.source)
        policy = CheckpointPolicy(
            every_steps=None if every == "auto" else every,
            every_seconds=None if seconds == "auto" else seconds,
            full_every=self.cfg.full_every,
            checkpoint_format=self.cfg.checkpoint_format,
        )
        try:
            self.mgr = self._make_manager(policy)
        except BaseException:
            self.kernel.backend.close()
            raise
        return None

    def _make_manager(self, policy: CheckpointPolicy) -> CheckpointManager:
        """The run's checkpoint manager (a multi-rank step gives each rank its own part chain: ``rkkernel.ranks``)."""
        return CheckpointManager(self.cfg.checkpoint_dir, policy, self.cfg.kernel_id)

    # ------------------------------------------------------------ restore
    def _series_from(self, rp: RestorePoint, source: str) -> dict[str, list[tuple[float, ...]]]:
        out: dict[str, list[tuple[float, ...]]] = {s.name: [] for s in self.krun.series}
        regions = rp.checkpoint.regions()
        for s in self.krun.series:
            info = regions.get(s.region)
            if info is None:
                continue
            if np.dtype(info.dtype) != np.dtype("<f8") or len(info.shape) != 2 or info.shape[1] != 1 + s.columns:
                raise RestoreInvalid(source, f"series {s.region!r} is {info.dtype}{list(info.shape)}, expected <f8[n, {1 + s.columns}]")
            rows = np.array(rp.checkpoint.region(s.region), dtype="<f8")
            steps = rows[:, 0]
            if not (np.isfinite(steps).all() and (np.diff(steps) > 0).all() and (steps <= rp.step).all() and (steps >= 0).all()):
                raise RestoreInvalid(source, f"series {s.region!r} has steps out of order or beyond step {rp.step}")
            out[s.name] = [(int(r[0]), *(float(v) for v in r[1:])) for r in rows]
        return out

    def _restore(self) -> int | None:
        """Restore the newest chain that restores; an exit status when the run must not go on."""
        excluded: list[str] = []
        hdf5.abandon_probes_when(lambda: self.stop.requested)  # a stop is not held up by a stuck libhdf5 probe
        while True:
            rp = self.mgr.latest(exclude=excluded)
            if rp is None:
                if excluded:
                    log.warning("no older restorable checkpoint in %s; starting from step 0", self.cfg.checkpoint_dir)
                else:
                    log.info("no checkpoint in %s; starting from step 0", self.cfg.checkpoint_dir)
                self.step = 0
                return None
            for name, why in rp.skipped:
                if name not in excluded:
                    log.warning("skipped checkpoint %s: %s", name, why)
            source = rp.chain[-1] if rp.chain else None
            testhook.fire("restore")
            try:
                series = self._series_from(rp, source or "<checkpoint>")
                step = self.kernel.restore_from_checkpoint(rp.checkpoint, source=source)
            except RestoreMismatch as exc:
                log.error("refusing to restore: %s", exc)
                return EX_USAGE
            except (CheckpointError, ValueError, TypeError, KeyError) as exc:
                log.warning("skipped chain %s: cannot restore it: %s; trying the next older one", ", ".join(rp.chain), exc)
                excluded.append(source or "")
                continue
            self.step, self.series, self.restored = step, series, rp
            log.info("restored from step %d (chain: %s) = %s", step, ", ".join(rp.chain), describe_chain(rp))
            self.events.restore(step, rp.chain)
            if step > self.cfg.steps:
                log.error("the checkpoint is at step %d, beyond --steps %d; refusing to go back", step, self.cfg.steps)
                return EX_USAGE
            return None

    # ------------------------------------------------------------ advance
    def _sample(self) -> None:
        """Samples due at the current step that no batch took (the start, an early finish)."""
        for s in self.krun.series:
            rows = self.series[s.name]
            due = s.every and (self.step % s.every == 0 or self.step == self.cfg.steps or self._finished())
            if due and (not rows or rows[-1][0] < self.step):
                if s.sumsq is not None:
                    rows.append((self.step, self._total(self.kernel.sumsq_now(s.sumsq(self.step)))))
                else:
                    rows.append((self.step, *s.sample(self.kernel, self.step)))

    def _device_samples(self, end: int) -> list[tuple[int, str, Series]]:
        """The device-reduced series' samples due in (step, end], ascending: taken inside the batch."""
        due = []
        for s in self.krun.series:
            if s.sumsq is None or not s.every:
                continue
            steps = set(range((self.step // s.every + 1) * s.every, end + 1, s.every))
            if end == self.cfg.steps:
                steps.add(end)
            due += [(t, s.sumsq(t), s) for t in steps if t > self.step]
        return sorted(due, key=lambda d: d[0])

    def _run_batch(self, end: int) -> None:
        """Advance to ``end``; device series sampled inside the batch (not cut at their steps)."""
        due = self._device_samples(end)
        if not due:
            self.kernel.run(end - self.step)
            return
        _, sums = self.kernel.run_sampled(end - self.step, [(t, name) for t, name, _ in due])
        for (t, _, s), planes in zip(due, sums, strict=False):  # fewer sums: terminated early
            rows = self.series[s.name]
            if not rows or rows[-1][0] < t:
                rows.append((t, self._total(planes)))

    def _total(self, planes: np.ndarray) -> float:
        """Σ of per-plane sums in global plane order (over every rank's owned planes when decomposed)."""
        from .reduce import combine_planes

        return combine_planes(planes) if self.krun.decomp is None else self.krun.decomp.total(planes)

    def _finished(self) -> bool:
        return self.done_at is not None

    def _check_done(self) -> None:
        if self.krun.done_at is not None and self.done_at is None:
            self.done_at = self.krun.done_at(self.kernel)

    def _snapshot(self, reason: str) -> SnapshotResponse:
        c, ready = self.kernel.snapshot(reuse=self.mgr.reusable())  # copied while the kernel goes on
        for s in self.krun.series:
            c.add_region(s.region, _series_array(s, self.series[s.name]))
        return SnapshotResponse(SnapshotRequest(self.step, reason), c, ready)

    def _next_stop(self) -> int:
        nxt = min(self.cfg.steps, self.step + max(1, self.cfg.batch))
        # device-reduced series do not cut batches (see _run_batch), unless the kernel may finish
        # early: then no sample may fall after the step at which it is seen to be done
        cut = [s.every for s in self.krun.series if s.sumsq is None or self.krun.done_at is not None]
        ckpt = self.cfg.checkpoint_every
        if ckpt == "auto":  # the manager's, once the interval is chosen (rkkernel.autointerval)
            ckpt = self.mgr.policy.every_steps
        for every in (ckpt, *cut):
            if every:
                nxt = min(nxt, (self.step // every + 1) * every)
        return nxt

    def _advance(self) -> None:
        progress = _Progress(self.cfg.progress, self.plugin.name, self.step, self.cfg.steps)
        t0, s0 = time.monotonic(), self.step
        try:
            while self.step < self.cfg.steps and not self._should_stop() and not self._finished():
                tb, before = time.perf_counter(), self.step
                self._run_batch(self._next_stop())
                self.stop.install()  # pocl may compile (and LLVM re-arm its handlers) at a first launch
                self.step = self.kernel.step
                if self.tuner is not None:
                    self.tuner.batch(self.step - before, time.perf_counter() - tb)
                self._check_done()
                self._sample()
                probe = self.tuner is not None and self.tuner.probe_due()
                if self.step < self.cfg.steps and not self._finished() and (probe or self._checkpoint_due()):
                    self.submitted = (self.step, self.mgr.stats.failed)
                    ts = time.perf_counter()
                    self.mgr.submit(self._snapshot("periodic"))
                    if probe and self.tuner is not None:
                        self.tuner.probed(self.step, time.perf_counter() - ts, self.submitted[1])
                        self.mgr.wait()  # once per run: the interval is known from the next batch on
                self._tune()
                self._boundary()
                self._report_written()
                progress.update(self.step, (self.step - s0) / max(1e-9, time.monotonic() - t0))
                if self.cfg.throttle_ms:
                    time.sleep(self.cfg.throttle_ms / 1000.0)
        finally:
            progress.close()

    # Hooks of a batch boundary; a multi-rank step (``rkkernel.ranks``) makes every rank decide alike.
    def _should_stop(self) -> bool:
        """Whether the run stops here (remembered in ``stopping`` for ``run``)."""
        self.stopping = self.stop.requested
        return self.stopping

    def _checkpoint_due(self) -> bool:
        return self.mgr.due(self.step)

    def _boundary(self) -> None:
        """After a batch and its checkpoint hand-over (nothing to do for one process)."""

    def _tune(self) -> None:
        """--checkpoint-every/--checkpoint-seconds auto: set the interval once the probe's cost is known."""
        if self.tuner is None or self.tuner.pending is None:
            return
        st = self.mgr.stats
        chosen = self.tuner.poll(st.last_write, st.failed)
        if chosen is None:
            return
        if chosen.steps is not None:
            self.mgr.policy = dataclasses.replace(self.mgr.policy, every_steps=chosen.steps)
        else:
            self.mgr.policy = dataclasses.replace(self.mgr.policy, every_seconds=chosen.seconds)
        log.info("%s", chosen.describe())

    def _report_written(self) -> None:
        """A ``checkpoint`` event once a write has landed in storage, not when it is handed over:
        the executor reads the event as "a restore can start here"."""
        step = self.mgr.stats.last_written_step
        if step is not None and step != self.reported_step:
            self.reported_step = step
            self.events.checkpoint(step)

    # ------------------------------------------------------------ stop
    def _stopped(self) -> int:
        self.mgr.flush()  # the periodic write in flight, if any
        self._report_written()
        durable = self._durable_step()
        if durable == self.step:
            # Nothing ran since the restore or the last checkpoint: that file is the stop's
            # checkpoint. Writing the step again would put a delta against itself over it.
            written = durable
            log.info("step %d is already checkpointed; the stop writes nothing new", written)
        else:
            written = self.mgr.final(self._snapshot("signal"))
            self.mgr.flush()
        doc = {
            "step": written,
            "signal": self.stop.signal_name,
            "kernel": self.plugin.name,
            "kernel_id": self.cfg.kernel_id,
            "steps": self.cfg.steps,
            "time": time.time(),
        }
        _write_marker(self.mgr, doc)
        self._log_checkpoint_stats()
        log.info("stopped at step %d on %s; checkpoint written", written, self.stop.signal_name)
        self.events.stop(written, self.stop.signal_name)
        if self.stop.extra:
            log.info("ignored further signals while stopping: %s", ", ".join(self.stop.extra))
        return EX_TEMPFAIL

    def _durable_step(self) -> int | None:
        """The step of the newest checkpoint this run restored from or wrote (None: neither)."""
        written = self.mgr.stats.last_written_step
        if written is not None:
            return written
        return self.restored.step if self.restored is not None else None

    # ------------------------------------------------------------ end
    def _final_checkpoint(self, start_step: int) -> None:
        """The last checkpoint; a storage failure is recorded, not fatal: the result comes first."""
        try:
            if self.step != start_step or self.restored is None:  # a rerun after completion writes nothing new
                self.mgr.final(self._snapshot("final"))
            self.mgr.flush()
            self._report_written()
        except (CheckpointError, OSError) as exc:
            self.checkpoint_failures.append(f"final checkpoint at step {self.step}: {exc}")
        if self.mgr.stats.failed:
            self.checkpoint_failures.append(f"{self.mgr.stats.failed} checkpoint write(s) failed, last: {self.mgr.stats.last_error}")

    def _log_checkpoint_stats(self) -> None:
        """What the manager decided: fulls, deltas and their sizes (the delta chain's payoff)."""
        st = self.mgr.stats
        if not st.completed:
            return
        full_avg = st.full_bytes / st.full if st.full else 0.0
        delta_avg = (st.bytes_written - st.full_bytes) / st.deltas if st.deltas else 0.0
        rel = f", {delta_avg / full_avg:.0%} of a full" if st.full and st.deltas else ""
        log.info(
            "checkpoints written: %d full (avg %.0f KiB), %d delta (avg %.0f KiB%s), %.1f MiB in all",
            st.full,
            full_avg / 1024,
            st.deltas,
            delta_avg / 1024,
            rel,
            st.bytes_written / 2**20,
        )

    def _end(self, start_step: int) -> int:
        self._final_checkpoint(start_step)
        self._log_checkpoint_stats()
        final_step = self.done_at if self.done_at is not None else self.step
        datasets, attrs = self.krun.result(self.kernel, final_step)
        spec = self.krun.spec
        all_datasets = dict(datasets)
        for s in self.krun.series:
            all_datasets[s.name] = _series_array(s, self.series[s.name])
        all_attrs: dict[str, object] = {
            "step": final_step,
            "grid": np.array(self.cfg.grid, dtype=np.int64),
            "kernel": self.plugin.name,
            "kernel_type": spec.kernel_type,
            "backend": self.kernel.backend_name,
            "params_fingerprint": self.krun.global_fingerprint or spec.fingerprint(),
            **attrs,
        }
        if self.checkpoint_failures:
            all_attrs["checkpoints_failed"] = "; ".join(self.checkpoint_failures)
        if self.krun.decomp is not None and not self.krun.decomp.root:
            log.info("done: step %d (rank %d; rank 0 writes the result)", final_step, self.krun.decomp.slab.rank)
            return EX_OK
        write_result(self.cfg.out, all_datasets, all_attrs)
        if self.checkpoint_failures:
            for line in self.checkpoint_failures:
                log.error("CHECKPOINTS FAILED: %s", line)
            log.error(
                "CHECKPOINTS FAILED in %s: the run completed and its result %s is written, but the checkpoints are incomplete",
                self.cfg.checkpoint_dir,
                os.fspath(self.cfg.out),
            )
        else:
            _clear_marker(self.mgr)
        log.info("done: step %d, wrote %s", final_step, os.fspath(self.cfg.out))
        return EX_OK

    # ------------------------------------------------------------ run
    def run(self) -> int:
        if self.cfg.steps < 0:
            log.error("--steps must be >= 0")
            return EX_USAGE
        rc = self._start()
        if rc is not None:
            return rc
        try:
            rc = self._restore()
            if rc is not None:
                return rc
            start_step = self.step
            self._check_done()
            if self.restored is None:
                self._sample()
            self._advance()
            if self.stopping and self.step < self.cfg.steps and not self._finished():
                return self._stopped()
            return self._end(start_step)
        finally:
            self.mgr.close()
            self.kernel.backend.close()
            # Handlers stay installed (they only record): a signal arriving while
            # the process exits must not kill it with a misleading status.


def _series_array(s: Series, rows: list[tuple[float, ...]]) -> np.ndarray:
    return np.array(rows, dtype="<f8").reshape(-1, 1 + s.columns)


def run_kernel(plugin: KernelPlugin, values: Mapping[str, Any], stop: StopFlag | None = None, events: EventWriter | None = None) -> int:
    """Run (or resume) ``plugin`` with validated option ``values``; ``stop`` lets the caller install signal handlers early."""
    return StepLoop(plugin, values, stop if stop is not None else StopFlag().install(), events).run()
