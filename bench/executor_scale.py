"""The status loop at scale: Slurm calls, head CPU and files read per poll, for N steps.

Drives the real :class:`~snakemake_executor_plugin_rkslurm.monitor.Monitor`
through its poll loop (``Monitor.plan`` once per poll, as the executor's
``check_active_jobs`` does) for N = 10, 100, 1,000 and 10,000 steps, each with
a real checkpoint folder (events file, progress file). Slurm is stand-in
``squeue``/``scontrol``/``sacct`` scripts on PATH that answer from rows
recorded on the local cluster (Slurm 22.05, ``bench/data/``: a RUNNING and a
PENDING job of each tool), with the job id and state filled in per id, and
log every call. Between polls the table moves on (about 2% of the steps
change between PENDING and RUNNING per poll); one id in 1,000 is unknown to
slurmctld and answered by sacct.

Both versions run in the same invocation, in interleaved rounds, each in its
own process: today's code (``--baseline``, default ``/work/main/plugin``) and
this checkout's (``plugin/`` next to this file), so the figures compare on the
same (possibly loaded) machine. Per N and version it prints the medians of:

- Slurm calls per poll (steady state, i.e. after the first poll),
- head CPU ms per poll (the Python process itself) and the stand-in tools' CPU,
- files opened per poll by the head (Python's ``open`` audit event),
- the first poll (which reads every folder once) and the adoption listing
  calls for N submissions (``tagged_jobs`` once per step at start-up).

Usage: ``python bench/executor_scale.py [--sizes 10,100,1000,10000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MINE = HERE.parent / "plugin"

SQUEUE = r"""#!/bin/sh
echo squeue >> "$RKB_DIR/calls"
tick=$(cat "$RKB_DIR/tick")
ids=""; list=""; fmt=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j) ids=$2; shift ;;
    --me|-u) list=1 ;;
    -O) fmt=O ;;
    -o) fmt=o ;;
  esac
  shift
done
if [ -n "$ids" ]; then
  echo "$ids" | tr , '\n' | awk -v tick="$tick" -v R="$(cat "$RKB_DIR/sq_running")" -v P="$(cat "$RKB_DIR/sq_pending")" \
    '{ id = $1; if (id % 1000 == 999) next; r = ((id + tick) % 100 < 10) ? R : P; sub(/^[0-9]+/, id, r); print r }'
  exit 0
fi
awk -v n="$(cat "$RKB_DIR/n")" -v tick="$tick" -v fmt="$fmt" 'BEGIN { for (i = 0; i < n; i++) { id = 1000 + i;
  st = ((id + tick) % 100 < 10) ? "RUNNING" : "PENDING"; tag = sprintf("rule_sim rkslurm:%024x", id);
  if (fmt == "o") print id "|" tag "|" st; else print id "|sim|0|" st "|" tag } }'
"""

SCONTROL = r"""#!/bin/sh
echo scontrol >> "$RKB_DIR/calls"
[ "$1" = show ] && [ "$2" = job ] || exit 0
id=$4
tick=$(cat "$RKB_DIR/tick")
if [ $((id % 1000)) -eq 999 ]; then echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi
if [ $(((id + tick) % 100)) -lt 10 ]; then t="$RKB_DIR/scontrol_running.txt"; else t="$RKB_DIR/scontrol_pending.txt"; fi
exec sed "s/^JobId=[0-9]*/JobId=$id/" "$t"
"""

SACCT = r"""#!/bin/sh
echo sacct >> "$RKB_DIR/calls"
ids=""
while [ $# -gt 0 ]; do [ "$1" = -j ] && { ids=$2; shift; }; shift; done
echo "$ids" | tr , '\n' | awk '{ print $1 "|RUNNING|0:0|n1|scavenger|00:00:10|UNLIMITED" }'
"""


def _row(path: Path, state: str) -> str:
    for line in path.read_text().splitlines():
        if f"|{state}|" in line or f"JobState={state} " in line:
            return line
    raise SystemExit(f"{path}: no recorded {state} row")


def setup_tools(d: Path, n: int) -> None:
    (d / "bin").mkdir(parents=True)
    for name, text in (("squeue", SQUEUE), ("scontrol", SCONTROL), ("sacct", SACCT)):
        p = d / "bin" / name
        p.write_text(text)
        p.chmod(0o755)
    (d / "sq_running").write_text(_row(DATA / "squeue_running_pending.txt", "RUNNING"))
    (d / "sq_pending").write_text(_row(DATA / "squeue_running_pending.txt", "PENDING"))
    shutil.copy(DATA / "scontrol_running.txt", d / "scontrol_running.txt")
    shutil.copy(DATA / "scontrol_pending.txt", d / "scontrol_pending.txt")
    (d / "n").write_text(str(n))
    (d / "tick").write_text("0")
    (d / "calls").write_text("")


def worker(n: int, polls: int, d: Path) -> dict[str, object]:
    """One version, one N: runs in a process whose PYTHONPATH picks the version."""
    from rkstep.events import EventWriter
    from snakemake_executor_plugin_rkslurm import monitor as mon
    from snakemake_executor_plugin_rkslurm.policy import PolicySettings

    setup_tools(d, n)
    os.environ["RKB_DIR"] = str(d)
    os.environ["PATH"] = f"{d / 'bin'}:{os.environ['PATH']}"
    steps = []
    for i in range(n):
        folder = d / "steps" / f"s{i}"
        folder.mkdir(parents=True)
        job = str(1000 + i)
        w = EventWriter(folder / "rkstep.events.jsonl", job=job)
        w.start(0)
        for k in (10, 20, 30):
            w.checkpoint(k)
        (folder / "rkslurm.progress.json").write_text(json.dumps({"step": 30}))
        step = mon.Step(rule="sim", checkpoint_dir=folder, export=str(folder), partition="scavenger")
        step.submitted(job, None, time.time())
        steps.append((i, step))
    monitor = mon.Monitor(mon.SlurmCli(), PolicySettings(), {"scavenger": "CANCEL"}, signal_lead=60)

    opens = [0, False]

    def hook(event: str, args: tuple) -> None:
        if opens[1] and event == "open":
            opens[0] += 1

    sys.addaudithook(hook)
    calls_file = d / "calls"
    rows = []
    for poll in range(polls + 1):
        (d / "tick").write_text(str(poll))
        calls_file.write_text("")
        t0, c0 = time.process_time(), os.times()
        opens[0], opens[1] = 0, True
        plans = monitor.plan(steps)
        for plan in plans:  # what the executor's act step does for a waiting step
            plan.step.history = plan.decision.history
        opens[1] = False
        t1, c1 = time.process_time(), os.times()
        assert len(plans) == n
        rows.append(
            {
                "calls": len(calls_file.read_text().splitlines()),
                "cpu_ms": (t1 - t0) * 1000,
                "tools_ms": ((c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)) * 1000,
                "opens": opens[0],
            }
        )
    # adoption at start-up: one listing question per submitted step
    calls_file.write_text("")
    cli = mon.SlurmCli()
    for i in range(min(n, 1000)):
        cli.tagged_jobs(f"rkslurm:{1000 + i:024x}")
    listing = len(calls_file.read_text().splitlines())
    steady = rows[1:] or rows
    return {
        "n": n,
        "polls": polls,
        "calls": statistics.median(r["calls"] for r in steady),
        "cpu_ms": statistics.median(r["cpu_ms"] for r in steady),
        "tools_ms": statistics.median(r["tools_ms"] for r in steady),
        "opens": statistics.median(r["opens"] for r in steady),
        "first": rows[0],
        "listing_calls": listing,
        "listing_steps": min(n, 1000),
    }


def run_worker(version: str, plugin: Path, n: int, polls: int) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(plugin))
    with tempfile.TemporaryDirectory(prefix="rkbench-") as tmp:
        p = subprocess.run(
            [sys.executable, __file__, "--worker", str(n), "--polls", str(polls), "--dir", tmp],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    if p.returncode != 0:
        raise SystemExit(f"{version} N={n} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000,10000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--polls", type=int, default=5, help="steady-state polls per run (after the first)")
    ap.add_argument("--baseline", default="/work/main/plugin", help="PYTHONPATH of today's code")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.polls, Path(a.dir))))
        return
    versions = [("today", Path(a.baseline)), ("issue21", MINE)]
    sizes = [int(s) for s in a.sizes.split(",")]
    results: dict[tuple[str, int], list[dict[str, object]]] = {}
    for n in sizes:
        for r in range(a.rounds):
            for version, plugin in versions if r % 2 == 0 else versions[::-1]:  # interleaved, alternating order
                # today's code forks one scontrol per step per poll: fewer polls at large N
                polls = a.polls if version != "today" else max(1, min(a.polls, 2000 // n))
                rounds = a.rounds if version != "today" or n < 10000 else 1
                if r >= rounds:
                    continue
                results.setdefault((version, n), []).append(run_worker(version, plugin, n, polls))
                print(f"  round {r + 1}: {version:8s} N={n:6d} done", file=sys.stderr, flush=True)
    print(f"executor_scale: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} (medians over rounds; a loaded shared machine)")
    hdr = (
        f"{'version':8s} {'N':>6s} {'calls/poll':>10s} {'head CPU ms/poll':>16s} {'tools CPU ms/poll':>17s} "
        f"{'files/poll':>10s} {'1st poll calls':>14s} {'1st poll files':>14s} {'listing calls':>16s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        for version, _ in versions:
            rs = results[(version, n)]
            med = {k: statistics.median(float(r[k]) for r in rs) for k in ("calls", "cpu_ms", "tools_ms", "opens")}  # type: ignore[arg-type]
            first = rs[0]["first"]
            print(
                f"{version:8s} {n:6d} {med['calls']:10.0f} {med['cpu_ms']:16.1f} {med['tools_ms']:17.1f} {med['opens']:10.0f} "
                f"{first['calls']:14d} {first['opens']:14d} {rs[0]['listing_calls']:>7d} / {rs[0]['listing_steps']:<5d}"  # type: ignore[index]
            )


if __name__ == "__main__":
    main()
