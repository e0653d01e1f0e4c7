"""The integration tests of tests/unit/test_data_shards.py, which holds their helpers and fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from btx_core.config.schema import DataSource
from btx_core.data.prepare import prepare_domain_data
from btx_core.data.sources import load_documents
from btx_core.errors import DataError
from tests.unit.test_data_shards import check_rank_slices, corpus, prepared, tokenizer, train_on_two_ranks  # noqa: F401 - fixtures


def test_each_rank_reads_only_its_slice(prepared, tmp_path) -> None:
    """Two gloo processes train on the same shards: each reads exactly its share of every global
    micro-batch (batch_indices of its rank), nothing else; together they read the global batch."""
    data = str(Path(prepared.train._paths[0]).parent)
    ranks = train_on_two_ranks(tmp_path, "from btx_core.data.prepare import TokenizedSplits\n"
                                         f"blocks = TokenizedSplits.load({data!r}).train\n"
                                         "extra = lambda: {}")
    check_rank_slices(ranks, len(prepared.train))
    assert all(got["rows_read"] == 12 for got in ranks)


def test_s3_corpus_is_streamed_and_prepared_like_a_local_one(s3_root, corpus, tokenizer, tmp_path, monkeypatch) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    for path in sorted(corpus.glob("*.jsonl")):
        fs.put_file(str(path), f"{s3_root}/corpus/{path.name}")
    fs.pipe({f"{s3_root}/corpus/zz-broken.jsonl": b"not json\n"})

    def no_download(*args, **kwargs):
        raise AssertionError("an object was downloaded whole")

    monkeypatch.setattr(type(fs), "get_file", no_download)
    monkeypatch.setattr(type(fs), "get", no_download)
    local = prepare_domain_data(DataSource(path=str(corpus), max_documents=500), tokenizer, 16, 0.1, "s",
                                tmp_path / "local")
    remote = prepare_domain_data(DataSource(path=f"{s3_root}/corpus", max_documents=500), tokenizer, 16, 0.1,
                                 "s", tmp_path / "remote")
    assert np.array_equal(np.asarray(local.train), np.asarray(remote.train))
    with pytest.raises(DataError, match="zz-broken.jsonl"):  # read to the end: the broken object
        load_documents(DataSource(path=f"{s3_root}/corpus"))

