"""rkrun's loop: restore, run in batches, checkpoint, stop cleanly on a signal.

Exit codes: 0 done; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 with a final
checkpoint and ``<ckdir>/rkrun.stopped.json`` written — run again to resume;
2 bad input or a checkpoint of another simulation.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkstep.events import EventWriter, NullWriter
from rkstep.protocol import EX_OK, EX_TEMPFAIL, EX_USAGE, STOP_MARKER

from .result import write_result
from .runtime import PersistentKernel, RestoreMismatch
from .signals import StopFlag
from .wavesim import WaveParams, current_field, load_velocity, make_spec

log = logging.getLogger("rkrun")

MARKER = STOP_MARKER
ENERGY_REGION = "rkrun.energy"


@dataclass
class RunConfig:
    grid: tuple[int, int, int]
    steps: int
    checkpoint_dir: str
    checkpoint_every: int | None
    out: str
    backend: str = "auto"
    checkpoint_seconds: float | None = None
    energy_every: int = 10
    batch: int = 32
    kernel_id: str = "wavesim"
    throttle_ms: float = 0.0
    progress: bool | None = None
    velocity: str | None = None  # .npy (nz, nx) model instead of the built-in one
    dx: float = 10.0
    v_top: float = 1500.0
    v_bottom: float = 2500.0


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


def _energy(kernel: PersistentKernel, step: int) -> float:
    field = current_field({n: kernel.region(n) for n in ("pressure_a", "pressure_b")}, step)
    f = field.astype(np.float64).ravel()
    # numpy's own pairwise sum, not BLAS (np.dot): its order does not depend on
    # OPENBLAS/OMP thread counts, so an interrupted run's energy series matches.
    return float(np.add.reduce(f * f))


class _Progress:
    """rich progress bar on a terminal, a log line every ~10% (or 30 s) otherwise."""

    def __init__(self, enabled: bool | None, start: int, total: int) -> None:
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.total = total
        self.last_pct = -1
        self.last_t = time.monotonic()
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("wavesim"),
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


def run_wavesim(cfg: RunConfig, stop: StopFlag | None = None, events: EventWriter | None = None) -> int:
    """Run (or resume) a wave simulation; ``stop`` lets the caller install signal handlers early."""
    stop = stop if stop is not None else StopFlag().install()
    events = events if events is not None else NullWriter(Path(os.devnull))
    if cfg.steps < 0:
        log.error("--steps must be >= 0")
        return EX_USAGE
    try:
        nx, ny, nz = cfg.grid
        model, extra = None, {}
        if cfg.velocity:
            model, digest = load_velocity(cfg.velocity, nx, nz)
            extra = {"model_sha256": digest, "model_vmax": float(model.max())}
        params = WaveParams(nx, ny, nz, dx=cfg.dx, v_top=cfg.v_top, v_bottom=cfg.v_bottom, **extra)
        spec = make_spec(params, velocity=model)
    except ValueError as exc:
        log.error("%s", exc)
        return EX_USAGE
    # Device runtimes install their own handlers when they load (LLVM in pocl
    # takes SIGUSR1 and SIGTERM): hold the stop signals until ours are back.
    with stop.held():
        kernel = PersistentKernel(spec, cfg.backend, kernel_id=cfg.kernel_id)
    log.info("backend %s: %s", kernel.backend_name, kernel.description)
    policy = CheckpointPolicy(every_steps=cfg.checkpoint_every, every_seconds=cfg.checkpoint_seconds)
    mgr = CheckpointManager(cfg.checkpoint_dir, policy, cfg.kernel_id)
    energy: list[tuple[int, float]] = []
    try:
        rp = mgr.latest()
        if rp is not None:
            for name, why in rp.skipped:
                log.warning("skipped checkpoint %s: %s", name, why)
            try:
                step = kernel.restore_from_checkpoint(rp.checkpoint, source=rp.chain[-1] if rp.chain else None)
            except RestoreMismatch as exc:
                log.error("refusing to restore: %s", exc)
                return EX_USAGE
            if ENERGY_REGION in rp.checkpoint.regions():
                energy = [(int(s), float(e)) for s, e in rp.checkpoint.region(ENERGY_REGION)]
            log.info("restored from step %d (chain: %s)", step, ", ".join(rp.chain))
            events.restore(step, rp.chain)
            if step > cfg.steps:
                log.error("the checkpoint is at step %d, beyond --steps %d; refusing to go back", step, cfg.steps)
                return EX_USAGE
        else:
            step = 0
            log.info("no checkpoint in %s; starting from step 0", cfg.checkpoint_dir)

        def sample() -> None:
            if cfg.energy_every and (step % cfg.energy_every == 0 or step == cfg.steps) and (not energy or energy[-1][0] < step):
                energy.append((step, _energy(kernel, step)))

        def snapshot(reason: str):
            c = kernel.create_checkpoint(reuse=mgr.reusable())
            c.add_region(ENERGY_REGION, np.array(energy, dtype="<f8").reshape(-1, 2))
            return SnapshotResponse(SnapshotRequest(step, reason), c)

        start_step = step
        if step == 0:
            sample()
        progress = _Progress(cfg.progress, step, cfg.steps)
        t0, s0 = time.monotonic(), step
        try:
            while step < cfg.steps and not stop.requested:
                nxt = min(cfg.steps, step + max(1, cfg.batch))
                for every in (cfg.checkpoint_every, cfg.energy_every):
                    if every:
                        nxt = min(nxt, (step // every + 1) * every)
                kernel.run(nxt - step)
                stop.install()  # pocl may compile (and LLVM re-arm its handlers) at a first launch
                step = kernel.step
                sample()
                if step < cfg.steps and mgr.due(step):
                    mgr.submit(snapshot("periodic"))
                    events.checkpoint(step)
                progress.update(step, (step - s0) / max(1e-9, time.monotonic() - t0))
                if cfg.throttle_ms:
                    time.sleep(cfg.throttle_ms / 1000.0)
        finally:
            progress.close()

        if stop.requested and step < cfg.steps:
            written = mgr.final(snapshot("signal"))
            mgr.flush()
            _write_marker(
                mgr,
                {"step": written, "signal": stop.signal_name, "kernel_id": cfg.kernel_id, "steps": cfg.steps, "time": time.time()},
            )
            log.info("stopped at step %d on %s; checkpoint written", written, stop.signal_name)
            events.stop(written, stop.signal_name)
            if stop.extra:
                log.info("ignored further signals while stopping: %s", ", ".join(stop.extra))
            return EX_TEMPFAIL

        if step != start_step or rp is None:  # a rerun after completion writes nothing new
            mgr.final(snapshot("final"))
        mgr.flush()
        regions = {n: kernel.region(n) for n in ("pressure_a", "pressure_b")}
        prev = regions["pressure_b"] if step % 2 == 0 else regions["pressure_a"]
        write_result(
            cfg.out,
            {
                "pressure": current_field(regions, step),
                "pressure_prev": prev,
                "velocity": kernel.region("velocity"),
                "energy": np.array(energy, dtype="<f8").reshape(-1, 2),
            },
            {
                "step": step,
                "grid": np.array(cfg.grid, dtype=np.int64),
                "kernel_type": spec.kernel_type,
                "backend": kernel.backend_name,
                "params_fingerprint": spec.fingerprint(),
                "dt": params.dt,
                "dx": params.dx,
                "source": np.array(params.source, dtype=np.int64),
            },
        )
        _clear_marker(mgr)
        log.info("done: step %d, wrote %s", step, os.fspath(cfg.out))
        return EX_OK
    finally:
        mgr.close()
        kernel.backend.close()
        # Handlers stay installed (they only record): a signal arriving while
        # the process exits must not kill it with a misleading status.
