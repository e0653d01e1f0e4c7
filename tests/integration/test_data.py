"""The integration tests of tests/unit/test_data.py, which holds their helpers and fixtures."""

from __future__ import annotations

import pytest

from btx_core.config.schema import DataSource
from btx_core.data.packing import data_cache_key
from btx_core.data.sources import load_documents
from btx_core.errors import DataError
from tests.unit.test_data import datasets_cache  # noqa: F401 - fixtures


def test_s3_directory_and_glob(s3_root: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.pipe({f"{s3_root}/data/a.jsonl": b'{"text": "first"}\n{"text": "second"}\n',
             f"{s3_root}/data/b.jsonl": b'{"text": "third"}\n',
             f"{s3_root}/text/x.txt": b"one document\nof two lines\n"})
    assert load_documents(DataSource(path=f"{s3_root}/data")) == ["first", "second", "third"]
    assert load_documents(DataSource(path=f"{s3_root}/data/b*.jsonl")) == ["third"]
    assert load_documents(DataSource(path=f"{s3_root}/text/")) == ["one document\nof two lines\n"]
    with pytest.raises(DataError, match="matches no data files"):
        load_documents(DataSource(path=f"{s3_root}/missing"))
    key = data_cache_key(DataSource(path=f"{s3_root}/data"), "t", 16, 0.1, "s")
    fs.pipe({f"{s3_root}/data/b.jsonl": b'{"text": "changed"}\n'})
    assert data_cache_key(DataSource(path=f"{s3_root}/data"), "t", 16, 0.1, "s") != key

