"""slurm/up and slurm/down: the partitions the executor tests rely on, and the
--no-accounting variant (a second, throw-away cluster on other ports)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fixtures_slurm import wait_until
from helpers import REPO
from snakemake_executor_plugin_rkslurm import slurmquery

pytestmark = pytest.mark.slurm


def _partitions() -> dict[str, dict[str, str]]:
    out = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True, text=True, check=True, timeout=20).stdout
    parts = {}
    for line in out.splitlines():
        kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        parts[kv["PartitionName"]] = kv
    return parts


def test_partitions_as_documented(slurm_env: dict[str, str]) -> None:
    p = _partitions()
    assert p["main"]["Default"] == "YES"
    assert int(p["urgent"]["PriorityTier"]) > int(p["scavenger"]["PriorityTier"])
    assert p["scavenger"]["PreemptMode"] == "CANCEL" and int(p["scavenger"]["GraceTime"]) > 0
    assert p["requeue"]["PreemptMode"] == "REQUEUE"
    assert p["short"]["MaxTime"] == "00:01:00"
    assert os.path.realpath("/etc/slurm/slurm.conf") == os.path.realpath(slurm_env["SLURM_CONF"])
    assert subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=20).returncode == 0


def test_no_accounting_cluster_up_idempotent_and_down(slurm_env: dict[str, str]) -> None:
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("needs root and the Debian Slurm packages")
    base = Path(tempfile.mkdtemp(prefix="rkslurm-noacct-", dir="/tmp"))
    base.chmod(0o755)  # munged runs as user munge and must reach its socket below
    env = {
        **os.environ,
        "RKSLURM_SLURM_BASE": str(base),
        "SLURM_CI_CTLD_PORT": "6927",
        "SLURM_CI_SLURMD_PORT": "6928",
        "SLURM_CI_LINK_ETC": "0",
        "SLURM_CI_CLUSTER": "noacct",
        "SLURM_CONF": str(base / "etc/slurm.conf"),
    }
    try:
        for _ in range(2):  # the second run finds everything up and changes nothing
            r = subprocess.run(["bash", str(REPO / "slurm/up"), "--no-accounting"], env=env, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout + r.stderr
        assert "slurmctld already running" in r.stdout
        assert "RKSLURM_SLURM_ACCOUNTING=0" in (base / "slurm.env").read_text()
        j = subprocess.run(
            ["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"], env=env, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()
        sacct = subprocess.run(["sacct", "-j", j], env=env, capture_output=True, text=True, timeout=20)
        assert sacct.returncode != 0  # accounting disabled: the executor must use slurmctld (squeue)
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]
        try:
            wait_until(
                lambda: slurmquery.query([j]).get(j) is not None and slurmquery.query([j])[j].state == "COMPLETED",
                60,
                "the job to complete",
            )
            assert slurmquery.query([j])[j].source == "squeue"
        finally:
            if old is None:
                del os.environ["SLURM_CONF"]
            else:
                os.environ["SLURM_CONF"] = old
        slurmds = sorted((base / "run").glob("slurmd.*.pid"))
        assert [f.name for f in slurmds] == ["slurmd.n1.pid", "slurmd.n2.pid"]  # default: 2 nodes, one slurmd each
        pids = [int(f.read_text()) for f in (base / "run/slurmctld.pid", *slurmds, base / "munge/run/munged.pid")]
    finally:
        d = subprocess.run(["bash", str(REPO / "slurm/down"), "--purge"], env=env, capture_output=True, text=True, timeout=120)
    assert d.returncode == 0, d.stdout + d.stderr
    time.sleep(0.5)
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not base.exists()
    # the shared cluster is untouched
    assert subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout.count("UP")


def test_generated_configs_run_no_command_substitution() -> None:
    """A backtick in an unquoted here-document of slurm/up is a command run when the config is written: a comment
    naming `srun rkrun ...` once ran srun on every bring-up (CI printed its "DNS SRV lookup failed" lines)."""
    text = (REPO / "slurm" / "up").read_text()
    bodies, delim = [], None
    for line in text.splitlines():
        if delim is None:
            m = re.search(r"<<-?\s*([A-Za-z_]+)\s*$", line)  # unquoted delimiter: the body is expanded
            if m:
                delim, body = m.group(1), []
        elif line.strip() == delim:
            bodies.append("\n".join(body))
            delim = None
        else:
            body.append(line)
    assert bodies, "slurm/up writes its configs with here-documents"
    for body in bodies:
        assert "`" not in body, body
