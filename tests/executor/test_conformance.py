"""Snakemake's executor-plugin conformance suite for ``rkslurm`` on the local cluster (issue 21).

``snakemake.common.tests.TestWorkflowsLocalStorageBase`` runs its "simple" and
"groups" workflows through the executor in-process, as the stock Slurm
plugin's tests/tests.py does for ``slurm``. A peer must pass what the stock
plugin passes; each case is bounded by a timeout so a hang fails, not stalls CI.
"""

from __future__ import annotations

import pytest
from snakemake.common.tests import TestWorkflowsLocalStorageBase

from snakemake_executor_plugin_rkslurm import ExecutorSettings

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


class TestWorkflows(TestWorkflowsLocalStorageBase):
    __test__ = True

    @pytest.fixture(autouse=True)
    def _cluster(self, slurm_env: dict[str, str]) -> None:
        """Skips with the reason when the local cluster is not up (``slurm/up``)."""

    def get_executor(self) -> str:
        return "rkslurm"

    def get_executor_settings(self) -> ExecutorSettings:
        return ExecutorSettings(poll_interval=1.0, slow_poll_interval=1.0, init_seconds_before_status_checks=1)
