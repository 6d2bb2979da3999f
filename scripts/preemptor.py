#!/usr/bin/env python3
"""Preempt a running simulation on purpose, for the demo: submit an `urgent` job
that needs the whole node whenever the watched step has checkpointed past the
next threshold.

    preemptor.py --watch WORKDIR/.snakemake/rkslurm --at-steps 800,1600 --report preemptions.json

For each threshold it waits until a job of the preemptible partition is
RUNNING (and, with --match, its name or comment contains the text) and the
newest checkpoint under --watch is at or past the threshold and newer than at
the previous preemption (so every preemption hits a restored, progressing
run), then `sbatch -p urgent -N1 --exclusive -w <the victim's (first) node> --wrap 'sleep N'`
(on a multi-node cluster an urgent job free to go elsewhere would take an idle
node instead of preempting anything) and waits
until the victim stops running. Exits 0 after the last threshold, 1 when the
simulation finished first or --timeout passed, writing the report either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rkckpt.chain import newest_named_step
from rkstep.protocol import STOP_MARKER
from snakemake_executor_plugin_rkslurm.ranks import expand_hostlist


@dataclass
class Preemption:
    victim: str
    urgent: str
    checkpoint_step: int
    submitted_at: float
    victim_stopped_at: float | None = None
    victim_state_after: str | None = None
    stopped_step: int | None = None


@dataclass
class Report:
    partition: str
    thresholds: list[int]
    preemptions: list[Preemption] = field(default_factory=list)
    ok: bool = False
    message: str = ""


def newest_checkpoint(root: Path) -> int | None:
    """Highest step among checkpoint files under ``root`` (any depth)."""
    steps = [newest_named_step(files) for _dir, _sub, files in os.walk(root)]
    return max((s for s in steps if s is not None), default=None)


def stopped_step(root: Path) -> int | None:
    """Step in the newest stop marker (rkstep.protocol.STOP_MARKER) under ``root`` (written when rkrun stops on a signal)."""
    found: list[tuple[float, int]] = []
    for marker in root.rglob(STOP_MARKER):
        try:
            doc = json.loads(marker.read_text())
            found.append((marker.stat().st_mtime, int(doc["step"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return max(found)[1] if found else None


def slurm(*args: str, timeout: float = 30) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def running_jobs(partition: str, match: str | None) -> list[str]:
    """Ids of RUNNING jobs in ``partition`` whose name or comment contains ``match``."""
    try:
        out = slurm("squeue", "-h", "-p", partition, "-t", "RUNNING", "-o", "%i|%j|%k")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"preemptor: squeue failed ({e}); retrying", file=sys.stderr)
        return []
    ids = []
    for line in out.splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and (match is None or match in parts[1] or match in parts[2]):
            ids.append(parts[0].strip())
    return ids


def job_state(job: str) -> str | None:
    try:
        out = slurm("squeue", "-h", "-j", job, "-t", "all", "-o", "%T")
    except (RuntimeError, subprocess.TimeoutExpired):
        return None  # gone from squeue (or slurmctld busy): not running as far as we can tell
    return out.strip() or None


def job_node(job: str) -> str | None:
    """The node a running job is on: the first of a multi-node job's (None when squeue cannot say).

    The urgent job takes that one node only: a multi-node victim is preempted as a whole, and the
    resubmission finds the other nodes free (what ``--rkslurm-min-nodes`` shrinks onto).
    """
    try:
        out = slurm("squeue", "-h", "-j", job, "-o", "%N")
    except (RuntimeError, subprocess.TimeoutExpired):
        return None
    try:
        nodes = expand_hostlist(out.strip())
    except ValueError:
        return None
    return nodes[0] if nodes else None


def write_report(path: Path | None, report: Report) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(report), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--watch", type=Path, required=True, help="folder holding the step's checkpoint folder(s)")
    ap.add_argument("--at-steps", required=True, help="comma-separated checkpoint steps at which to preempt, e.g. 800,1600")
    ap.add_argument("--partition", default="scavenger", help="preemptible partition the simulation runs in")
    ap.add_argument("--urgent-partition", default="urgent")
    ap.add_argument("--match", default=None, help="only jobs whose name or comment contains this (e.g. rule_simulate)")
    ap.add_argument("--sleep", type=int, default=8, help="seconds the urgent job holds the node")
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    ap.add_argument("--done-file", type=Path, help="stop (failing) when this file appears: the simulation finished")
    ap.add_argument("--report", type=Path, help="JSON report, rewritten after every preemption")
    a = ap.parse_args(argv)
    try:
        thresholds = sorted(int(s) for s in a.at_steps.split(",") if s.strip())
    except ValueError:
        ap.error(f"--at-steps must be integers, got {a.at_steps!r}")
    report = Report(partition=a.partition, thresholds=thresholds)
    deadline = time.monotonic() + a.timeout
    last_step = -1
    for i, threshold in enumerate(thresholds, 1):
        victim: str | None = None
        step: int | None = None
        while True:
            if time.monotonic() > deadline:
                report.message = (
                    f"timed out after {a.timeout:.0f} s waiting for preemption {i} (checkpoint >= {threshold}); newest checkpoint {step}"
                )
                write_report(a.report, report)
                print(f"preemptor: {report.message}", file=sys.stderr)
                return 1
            if a.done_file is not None and a.done_file.exists():
                report.message = f"the simulation finished after {len(report.preemptions)} of {len(thresholds)} preemptions"
                write_report(a.report, report)
                print(f"preemptor: {report.message}", file=sys.stderr)
                return 1
            jobs = running_jobs(a.partition, a.match)
            step = newest_checkpoint(a.watch)
            if jobs and step is not None and step >= threshold and step > last_step:
                victim = jobs[0]
                break
            time.sleep(a.poll)
        node = job_node(victim)
        out = slurm(
            "sbatch",
            "--parsable",
            "-p",
            a.urgent_partition,
            "-N1",
            "--exclusive",
            *(["-w", node] if node else []),
            "-J",
            "rkslurm-preemptor",
            "-o",
            "/dev/null",
            "--wrap",
            f"sleep {a.sleep}",
        )
        urgent = out.strip().split(";")[0]
        p = Preemption(victim=victim, urgent=urgent, checkpoint_step=step, submitted_at=time.time())
        print(
            f"preemptor: preemption {i}: job {victim} at checkpoint step {step}; submitted urgent job {urgent} (sleep {a.sleep})",
            flush=True,
        )
        stop_deadline = time.monotonic() + 90
        while time.monotonic() < stop_deadline:
            st = job_state(victim)
            if st != "RUNNING":
                p.victim_state_after = st
                break
            time.sleep(a.poll)
        p.victim_stopped_at = time.time()
        time.sleep(1.0)  # let rkrun finish its stop marker
        p.stopped_step = stopped_step(a.watch)
        report.preemptions.append(p)
        write_report(a.report, report)
        print(
            f"preemptor: job {victim} left RUNNING after {p.victim_stopped_at - p.submitted_at:.1f} s (now {p.victim_state_after or 'gone'}); the step stopped at {p.stopped_step}",
            flush=True,
        )
        last_step = max(step, p.stopped_step or step)
    report.ok = True
    report.message = f"preempted {len(report.preemptions)} times"
    write_report(a.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
