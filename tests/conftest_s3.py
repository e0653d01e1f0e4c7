"""Pytest plugin: a real S3 server (moto) on 127.0.0.1 for integration tests.

Enable with `pytest_plugins = ["tests.conftest_s3"]` in tests/conftest.py. The server starts
on first use, once per session; each test gets its own prefix in one shared bucket. The AWS
variables are set for the rest of the session (they point at the loopback server only) and
restored afterwards.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

S3_BUCKET = "btx-test-store"
S3_KEY_ID = "testing"
S3_SECRET = "testing"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server with bucket `S3_BUCKET`, reachable through the AWS env vars."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    # werkzeug logs every request at INFO; it drowns pytest's output on failure.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", S3_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # No region_name here or in s3fs client_kwargs: it makes bucket creation fail on moto.
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_root(s3_endpoint: str) -> str:
    """`s3://bucket/prefix` unique to this test."""
    return f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_auth_enforced(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make moto check credentials: only IAM users' keys (none exist) are accepted."""
    import moto.settings

    # ThreadedMotoServer runs in this process, so its auth switch is this module attribute.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
