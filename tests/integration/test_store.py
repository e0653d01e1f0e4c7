"""The integration tests of tests/unit/test_store.py, which holds their helpers and fixtures."""

from __future__ import annotations

import pytest

from btx_core.errors import IncompleteOutputError, StoreError
from btx_core.store.core import MANIFEST, Manifest, Store
from tests.support.params import param_fixture
from tests.unit.test_store import (  # noqa: F401 - fixtures, and tests that run here too
    FILES,
    _full_text,
    store,
    stored_path,
    test_checkpoints_ignore_incomplete_and_prune,
    test_delete_spares_siblings_sharing_a_prefix,
    test_directory_without_manifest_does_not_exist,
    test_exists_with_matches_config_and_inputs,
    test_failed_first_write_leaves_nothing_complete,
    test_failed_overwrite_never_mixes_old_and_new,
    test_invalid_or_incomplete_manifest,
    test_manifest_written_after_every_file,
    test_overwrite_replaces_files,
    test_round_trip,
    test_silently_truncated_upload_gets_no_manifest,
    test_verify_names_the_corrupt_file,
    write,
)

# the integration values of store's parameter
store_param = param_fixture("store_param", "s3")


def test_fetch_reuses_cache_and_repairs_it(s3_root, tmp_path, monkeypatch):
    store = Store(s3_root)
    loc = store.child("out")
    m = write(store, tmp_path, loc)
    first = store.fetch(loc, tmp_path / "cache")
    assert first == tmp_path / "cache" / m.hash
    assert Manifest.from_json((first / MANIFEST).read_bytes()).hash == m.hash

    def no_download(*a, **kw):
        raise AssertionError("downloaded although the cache holds this manifest")

    with monkeypatch.context() as mp:
        mp.setattr(store.fs, "get", no_download)
        assert store.fetch(loc, tmp_path / "cache") == first

    (first / "model.safetensors").write_bytes(b"truncated")
    again = store.fetch(loc, tmp_path / "cache")
    assert again == first
    assert (again / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_upload_checksums_reach_the_server_and_the_environment_wins(s3_root, tmp_path, monkeypatch):
    """`store_transfer.upload_checksums`: botocore's CRC32 of each upload by default, none with
    `when_required` (for stores that refuse it); asked of the server, not of the client's config."""
    import boto3

    from btx_core.config.execution import TransferPolicy

    def stored_crc32(store: Store, tag: str) -> str | None:
        location = store.child(tag)
        write(store, tmp_path, location)
        bucket, _, key = stored_path(store, location, "model.safetensors").partition("/")
        client = boto3.session.Session().client("s3")  # not the default session's cached credentials
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        return head.get("ChecksumCRC32")

    options = {"skip_instance_cache": True}
    assert stored_crc32(Store(s3_root, options), "default")
    no_crc = TransferPolicy(upload_checksums="when_required")
    assert stored_crc32(Store(s3_root, options, transfer=no_crc), "none") is None
    assert Store(s3_root, options).fs.config_kwargs["response_checksum_validation"] == "when_required"
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_SUPPORTED")  # the environment wins
    assert stored_crc32(Store(s3_root, options, transfer=no_crc), "env")


def test_missing_bucket_is_a_store_error(s3_endpoint, tmp_path):
    store = Store("s3://btx-no-such-bucket/run")
    loc = store.child("out")
    with pytest.raises(StoreError, match="bucket 'btx-no-such-bucket' does not exist"):
        write(store, tmp_path, loc)
    # Not "incomplete": a misconfigured store must fail before a stage does its work.
    with pytest.raises(StoreError, match="does not exist") as err:
        store.is_complete(loc)
    assert not isinstance(err.value, IncompleteOutputError)
    with pytest.raises(StoreError, match="does not exist"):
        store.list_checkpoints(store.child("ckpt"))


def test_bad_credentials_never_leak(s3_root, s3_auth_enforced, tmp_path, monkeypatch, caplog):
    secret, key_id = "sekrit-Zq9vX2-do-not-print", "AKIABTXLEAKCHECK0001"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # fsspec caches filesystem instances by arguments, not by environment.
    store = Store(s3_root, storage_options={"skip_instance_cache": True})
    caplog.set_level("DEBUG", logger="btx_core")
    for call in (lambda: write(store, tmp_path, store.child("out")),
                 lambda: store.is_complete(store.child("out"))):
        with pytest.raises(StoreError, match="access denied.*AWS_SECRET_ACCESS_KEY") as err:
            call()
        assert secret not in _full_text(err.value)
        assert key_id not in _full_text(err.value)
    assert secret not in caplog.text

