"""Shared fixtures. One SparkSession per test session (created lazily, only by Spark tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test with a clear reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (../shared/data is not part of the project)")
    return path


@pytest.fixture(scope="session")
def spark():
    """A local[2] SparkSession shared by every Spark test in the session."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from spark_jobs.session import get_spark

    session = get_spark(master="local[2]", driver_memory="2g", shuffle_partitions=4, app_name="seqrec-tests")
    yield session
    session.stop()
