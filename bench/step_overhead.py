#!/usr/bin/env python3
"""What a checkpointed, sampled step costs against the bare kernel: ``rkrun`` step rates.

Each configuration runs ``rkrun wavesim`` (the real step loop: ``rkkernel.cli``
→ ``runner.StepLoop``) in a fresh process and times its advance phase, from
the first batch to the last plus the drain of the periodic write still in
flight (wall time and the process's CPU time, all threads), so start-up (imports, kernel build, restore check), the final
checkpoint and the result file are left out of every row alike. Rows:

* ``bare``: no periodic checkpoints, no sampling (``--energy-every`` past the end);
* ``default``: rkrun's defaults (``--energy-every 10``, no periodic checkpoint: a
  step is checkpointed when Slurm signals it), the row issue 19's "default
  options" target is about;
* ``ckpt/100``, ``ckpt/20``: ``--checkpoint-every`` 100 / 20, sampling off;
* ``sample+ckpt/100``: ``--energy-every 10 --checkpoint-every 100``;
* ``tt bare``, ``tt ckpt/2`` (``--traveltime``): the traveltime kernel at the
  README's ``--checkpoint-every 2`` against itself without checkpoints.

Configurations are interleaved round by round (bare, sample, ckpt, ... then
again) and each figure is the median over rounds, so a noisy neighbour hits
every row alike. The table gives steps/s and the rate relative to the bare
kernel of the same grid, and the CPU seconds per step relative to it: on a
shared, loaded machine the wall-clock rate swings by 2-4x between rounds,
while the CPU a checkpoint adds (copy, checksum, write, retention) is what
it competes with the kernel for. Figures only; nothing is asserted.

    python3 bench/step_overhead.py                       # 128^3 and 192^3, 3 rounds, --backend auto
    python3 bench/step_overhead.py --sizes 128 --rounds 5 --steps 600 --traveltime
    python3 bench/step_overhead.py --trees before=/work/main/plugin after=plugin --configs bare ckpt/20   # two source trees, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

#: run inside the child: rkrun's own entry point, with StepLoop._advance timed
CHILD = r"""
import json, sys, time
import rkkernel.runner as runner
timing = {}
orig = runner.StepLoop._advance
def timed(self):
    s0, t0, c0 = self.step, time.perf_counter(), time.process_time()
    orig(self)
    self.mgr._wait_idle()  # the periodic write still in flight belongs to the advance phase
    timing.update(steps=self.step - s0, seconds=time.perf_counter() - t0, cpu=time.process_time() - c0,
                  backend=self.kernel.backend_name,
                  written=self.mgr.stats.completed, wait=self.mgr.stats.wait_seconds, writer=self.mgr.stats.seconds,
                  phases=getattr(self.mgr.stats, "phase_cpu", {}))
runner.StepLoop._advance = timed
from rkkernel.cli import main
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(timing, f)
"""

WAVE_CONFIGS = {
    "bare": [],
    "default": ["--energy-every", "10"],
    "ckpt/100": ["--checkpoint-every", "100"],
    "ckpt/20": ["--checkpoint-every", "20"],
    "sample+ckpt/100": ["--energy-every", "10", "--checkpoint-every", "100"],
}
TT_CONFIGS = {"tt bare": [], "tt ckpt/2": ["--checkpoint-every", "2"]}


def run_one(kernel: str, n: int, steps: int, extra: list[str], backend: str, workdir: Path, tree: str | None = None) -> dict:
    ck = Path(tempfile.mkdtemp(prefix="ck-", dir=workdir))
    timing_file = ck.with_suffix(".json")
    args = [kernel, "--grid", str(n), str(n), str(n), "--steps", str(steps), "--backend", backend]
    args += ["--checkpoint-dir", str(ck), "--out", str(ck.with_suffix(".h5")), "--batch", "32"]
    if kernel == "wavesim" and "--energy-every" not in extra:
        args += ["--energy-every", str(steps + 1)]  # sampling off: only step 0 and the last step
    env = dict(os.environ)
    if tree is not None:  # another source tree of the plugin packages (PYTHONPATH wins over the installed ones)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(tree).absolute()), *filter(None, [env.get("PYTHONPATH")])])
    p = subprocess.run([sys.executable, "-c", CHILD, str(timing_file), *args, *extra], capture_output=True, text=True, env=env)
    if p.returncode != 0 or not timing_file.exists():
        raise SystemExit(f"rkrun {' '.join(args + extra)} failed ({p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    t = json.loads(timing_file.read_text())
    subprocess.run(["rm", "-rf", str(ck), str(timing_file), str(ck.with_suffix(".h5"))], check=False)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192])
    ap.add_argument("--steps", type=int, default=400, help="steps per run (a multiple of 100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--traveltime", action="store_true", help="add the traveltime rows at 128^3 (checkpoint every 2)")
    ap.add_argument("--tt-steps", type=int, default=64)
    ap.add_argument("--dir", default=None, help="scratch folder for checkpoints (default: a temp folder)")
    ap.add_argument("--configs", nargs="+", default=list(WAVE_CONFIGS), choices=list(WAVE_CONFIGS), help="wavesim rows to run")
    ap.add_argument("--trees", nargs="+", default=[], metavar="LABEL=PATH", help="compare plugin source trees (each row per tree)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="step_overhead-", dir=a.dir))
    trees = [tuple(t.split("=", 1)) for t in a.trees] or [("", None)]
    jobs = []
    for tl, tree in trees:
        pre = f"{tl}: " if tl else ""
        jobs += [
            (f"{pre}{n}^3 {name}", "wavesim", n, a.steps, WAVE_CONFIGS[name], tree, f"{pre}{n}^3 bare")
            for n in a.sizes
            for name in a.configs
        ]
        if a.traveltime:
            jobs += [
                (f"{pre}128^3 {name}", "traveltime", 128, a.tt_steps, extra, tree, f"{pre}128^3 tt bare")
                for name, extra in TT_CONFIGS.items()
            ]
    rates: dict[str, list[float]] = {j[0]: [] for j in jobs}
    cpus: dict[str, list[float]] = {j[0]: [] for j in jobs}  # CPU seconds per step
    info: dict[str, dict] = {}
    for r in range(a.rounds):
        for label, kernel, n, steps, extra, tree, _bare in jobs:
            t = run_one(kernel, n, steps, extra, a.backend, work, tree)
            rates[label].append(t["steps"] / t["seconds"])
            cpus[label].append(t["cpu"] / t["steps"])
            info[label] = t
            print(f"round {r + 1}/{a.rounds} {label:<18} {rates[label][-1]:8.1f} steps/s", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    print(f"\nrkrun step rate, median of {a.rounds} interleaved rounds; backend {next(iter(info.values()))['backend']}; "
          f"{a.steps} steps per wavesim run; {os.cpu_count()} CPUs, load average {load:.1f}\n")  # fmt: skip
    print("| run | steps/s | vs bare | overhead | CPU ms/step | CPU vs bare | checkpoints | writer s | back-pressure s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, _kernel, _n, _steps, _extra, _tree, bare_label in jobs:
        med = statistics.median(rates[label])
        rel = med / statistics.median(rates[bare_label]) if bare_label in rates else float("nan")
        t = info[label]
        cpu = statistics.median(cpus[label])
        crel = cpu / statistics.median(cpus[bare_label]) if bare_label in cpus else float("nan")
        print(f"| {label} | {med:.1f} | {rel:.2f}x | {1 / rel - 1:+.0%} | {cpu * 1e3:.3f} | {crel:.2f}x "
              f"| {t['written']} | {t['writer']:.2f} | {t['wait']:.2f} |")  # fmt: skip
    phased = [(label, info[label]) for label, *_ in jobs if info[label].get("phases") and info[label]["written"]]
    if phased:
        names = list(next(iter(phased))[1]["phases"])
        print("\nwriter thread CPU ms per checkpoint by phase (last round; the CRC helper thread not included)\n")
        print("| run | " + " | ".join(names) + " | all |")
        print("|---|" + "---:|" * (len(names) + 1))
        for label, t in phased:
            per = {k: v * 1e3 / t["written"] for k, v in t["phases"].items()}
            print(f"| {label} | " + " | ".join(f"{per.get(k, 0.0):.1f}" for k in names) + f" | {sum(per.values()):.1f} |")


if __name__ == "__main__":
    main()
