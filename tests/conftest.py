"""Shared pytest setup. Fixture modules per concern are listed in pytest_plugins; plain helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import VECTORS

pytest_plugins: list[str] = []
for _name in ("fixtures_s3", "fixtures_slurm", "fixtures_kernel"):
    if (Path(__file__).parent / f"{_name}.py").exists():
        pytest_plugins.append(_name)


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"reference vectors not found at {VECTORS}")
    return VECTORS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RKSLURM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; set RKSLURM_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
