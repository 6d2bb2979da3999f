"""The head's Slurm commands for one workflow of N tiny checkpointing steps on the local cluster.

Runs ``snakemake --executor <each> --jobs N`` on the same workflow (the test
step script of tests/fixtures_slurm.py, ``--steps 12 --delay 0.25``, its own
checkpoint folder per step) on the running local cluster (``slurm/up``;
``source $RKSLURM_SLURM_BASE/slurm.env`` first), with logging wrappers first
on PATH that count the commands the head runs (jobs' own calls, which carry
SLURM_JOB_ID, are not counted). No interference: this compares the steady
cost of watching N steps. Prints wall time, commands by kind, status calls
per minute and the head's CPU (snakemake and the tools it ran).

Usage: ``python bench/cluster_scale.py [--n 60] [--executors rkslurm,slurm]``
(``PYTHONPATH`` picks the rkslurm code under test).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fixtures_slurm import STEP_SCRIPT  # noqa: E402

TOOLS = ("squeue", "sacct", "scontrol", "sbatch", "scancel", "sinfo", "sacctmgr", "sshare")
WRAPPER = """#!/bin/sh
[ -z "$SLURM_JOB_ID" ] && printf '%s %s %s\\n' "$(date +%s.%N)" "{name}" "$*" >> "{log}"
exec {real} "$@"
"""


def kind(name: str, args: str) -> str:
    a = f" {args} "
    if name == "squeue":
        return "squeue --me" if "--me" in a else "squeue -j" if " -j " in a else "squeue -u" if " -u " in a else "squeue"
    if name == "sacct":
        return "sacct -j" if " -j " in a else "sacct (other)"
    if name == "scontrol":
        return "scontrol " + " ".join(args.split()[:2])
    return name


def run(executor: str, n: int, root: Path) -> dict[str, object]:
    root.mkdir(parents=True)
    (root / "step.py").write_text(STEP_SCRIPT)
    (root / "Snakefile").write_text(
        f"""
rule all:
    input: expand("out/{{i}}.json", i=range({n}))

rule sim:
    output: "out/{{i}}.json"
    resources: slurm_partition="scavenger", mem_mb=50
    shell: "exec {sys.executable} step.py --steps 12 --seed s{{wildcards.i}} --delay 0.25 --checkpoint-dir ck/{{wildcards.i}} --out {{output}}"
"""
    )
    log = root / "calls.log"
    log.write_text("")
    bindir = root / "wrapbin"
    bindir.mkdir()
    for name in TOOLS:
        real = shutil.which(name)
        if real:
            (bindir / name).write_text(WRAPPER.format(name=name, log=log, real=real))
            (bindir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--executor", executor, "--jobs", str(n), "--latency-wait", "5"]
    if executor == "rkslurm":
        cmd += ["--rkslurm-poll-interval", "2", "--rkslurm-slow-poll-interval", "5"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{executor}: snakemake failed:\n{(p.stdout + p.stderr)[-4000:]}")
    calls = [line.split(" ", 2) for line in log.read_text().splitlines()]
    kinds = Counter(kind(c[1], c[2] if len(c) > 2 else "") for c in calls)
    status = sum(v for k, v in kinds.items() if k in ("squeue -j", "sacct -j", "scontrol show job", "squeue -u", "squeue"))
    return {
        "executor": executor,
        "n": n,
        "wall_s": wall,
        "commands": len(calls),
        "kinds": dict(sorted(kinds.items())),
        "status_calls": status,
        "status_per_min": status / (wall / 60),
        "head_cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--executors", default="rkslurm,slurm")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rkscale-") as tmp:
        for ex in a.executors.split(","):
            rows.append(run(ex, a.n, Path(tmp) / ex))
            print(f"  {ex} done", file=sys.stderr, flush=True)
    print(f"cluster_scale: N={a.n} steps, PYTHONPATH={os.environ.get('PYTHONPATH', '')} (load {os.getloadavg()[0]:.1f})")
    print(f"{'executor':9s} {'wall s':>7s} {'commands':>8s} {'status calls':>12s} {'status/min':>10s} {'head CPU s':>10s}  by kind")
    for r in rows:
        print(
            f"{r['executor']:9s} {r['wall_s']:7.0f} {r['commands']:8d} {r['status_calls']:12d} {r['status_per_min']:10.1f} "
            f"{r['head_cpu_s']:10.1f}  {r['kinds']}"
        )


if __name__ == "__main__":
    main()
