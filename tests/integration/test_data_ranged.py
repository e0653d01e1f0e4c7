"""The integration tests of tests/unit/test_data_ranged.py, which holds their helpers and fixtures."""

from __future__ import annotations

import pytest
import torch

from btx_core.config.execution import TransferPolicy
from btx_core.data.prepare import TokenizedSplits
from btx_core.data.ranged import RangedTokenBlocks
from btx_core.data.shards import TokenBlocks
from btx_core.errors import StoreError
from btx_core.store.core import Store
from btx_core.training.loop import train
from tests.unit.test_data_ranged import SEQ_LEN, pico_settings, prepared_dir, stored  # noqa: F401 - fixtures
from tests.unit.test_data_shards import check_rank_slices, pico, tokenizer, train_on_two_ranks  # noqa: F401
from tests.unit.test_train import DirSink, weights


def test_training_from_s3_reads_ranged_and_matches_a_download(s3_root, prepared_dir, tmp_path) -> None:
    """The default on an s3:// store: the same weights as training on a downloaded copy, nothing
    of the corpus on local disk, and an interrupted run resumes to bit-identical weights."""
    data = stored(Store(s3_root), prepared_dir)
    lazy = data.load(Store(s3_root), tmp_path / "lazy")
    copy = data.load(Store(s3_root, transfer=TransferPolicy(prepared_data="download")), tmp_path / "copy")
    assert isinstance(lazy.train, RangedTokenBlocks) and isinstance(copy.train, TokenBlocks)
    torch.set_num_threads(1)
    from_s3, from_copy = pico(), pico()
    train(from_s3, lazy.train, pico_settings())
    train(from_copy, copy.train, pico_settings())
    assert all(torch.equal(a, b) for a, b in zip(weights(from_s3).values(), weights(from_copy).values(), strict=True))
    assert lazy.train.rows_read <= 4 * 4 * 2
    assert not list((tmp_path / "lazy").rglob("*.tokens"))
    assert list((tmp_path / "copy").rglob("*.tokens"))

    resumed, sink = pico(), DirSink(tmp_path / "ckpt")
    train(resumed, lazy.train, pico_settings(checkpoint_every=1), checkpoints=sink, stop_after=2)
    train(resumed, data.load(Store(s3_root), tmp_path / "lazy").train, pico_settings(checkpoint_every=1),
          checkpoints=sink)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed).values(), weights(from_s3).values(), strict=True))


def test_each_rank_reads_only_its_slice_from_s3(s3_root, prepared_dir, tmp_path) -> None:
    """Two gloo ranks train from the S3 store with ranged reads: each fetches exactly the bytes of
    its share of every global micro-batch, and together they read the global batch."""
    data = stored(Store(s3_root), prepared_dir)
    ranks = train_on_two_ranks(tmp_path, f"""
from btx_core.data.cache import PreparedData
from btx_core.store.core import Store
store = Store({s3_root!r})
blocks = PreparedData({data.location!r}, store.read_manifest({data.location!r})).load(store, Path({str(tmp_path / "cache")!r})).train
sizes = []
read = store.read_ranges
store.read_ranges = lambda loc, ranges: sizes.extend(e - s for _, s, e in ranges) or read(loc, ranges)
extra = lambda: {{"bytes": sum(sizes)}}
""")
    expected = check_rank_slices(ranks, len(TokenizedSplits.load(prepared_dir).train))
    for got, mine in zip(ranks, expected, strict=True):
        unique = sum(len(set(rows)) for rows in mine)
        assert got["rows_read"] == unique
        assert got["bytes"] == unique * SEQ_LEN * 2  # uint16 ids: its rows' bytes, nothing more


def test_an_endpoint_lost_during_training_is_a_store_error_naming_it(prepared_dir, tmp_path, monkeypatch) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in (("AWS_ENDPOINT_URL_S3", f"http://{host}:{port}"), ("AWS_ACCESS_KEY_ID", "k"),
                        ("AWS_SECRET_ACCESS_KEY", "s"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    try:
        store = Store("s3://lost-endpoint/run", transfer=TransferPolicy(attempts=2))
        store.fs.mkdir("lost-endpoint")
        data = stored(store, prepared_dir)
        blocks = data.load(store, tmp_path / "cache").train
        blocks[0]
    finally:
        server.stop()
    with pytest.raises(StoreError, match=rf"cannot reach endpoint http://{host}:{port} \(reading .*corpus\)"):
        train(pico(), blocks, pico_settings())

