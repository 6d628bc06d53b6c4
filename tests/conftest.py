"""Shared fixtures. One SparkSession and one S3 server per test session (each created lazily, only
by the tests that use them)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server, in a thread of this process) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """`s3://<new bucket>` on the test S3 server, with the AWS environment of this process (and so of
    its subprocesses) pointing at it: dummy credentials, endpoint, region."""
    import pyarrow.fs as pafs

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance metadata service
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"seqrec-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}"
