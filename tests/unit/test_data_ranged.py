"""Prepared corpora read from the store block by block (`store_transfer.prepared_data: ranged`):
the same rows as the local shards, one ranged read per run of consecutive rows, each block
checked against its CRC-32, only a rank's own slice read, the same trained weights as a
download, and clear errors for a damaged shard or an endpoint that went away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from btx_core.config.schema import DataSource, TrainSettings
from btx_core.data.cache import PreparedData
from btx_core.data.prepare import TokenizedSplits, prepare_domain_data
from btx_core.data.ranged import RangedTokenBlocks, open_ranged
from btx_core.errors import DataError, IntegrityError, StoreError
from btx_core.store.core import Store
from btx_core.training.read_ahead import ReadAhead
from tests.unit.test_data_shards import tokenizer  # noqa: F401

SEQ_LEN = 16
SHARD_BLOCKS = 64  # several shards, so that reads cross their boundaries


@pytest.fixture(scope="module")
def prepared_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    directory = tmp_path_factory.mktemp("prepared") / "data"
    prepare_domain_data(DataSource(builtin="general", max_documents=600), tokenizer, SEQ_LEN, 0.1, "s",
                        directory, shard_tokens=SHARD_BLOCKS * SEQ_LEN)
    return directory


def stored(store: Store, prepared_dir: Path) -> PreparedData:
    location = store.child("_data", "corpus")
    return PreparedData(location, store.write_dir(prepared_dir, location, stage="data", config_hash="k"))


@pytest.fixture
def local(prepared_dir: Path, tmp_path: Path) -> tuple[Store, PreparedData]:
    store = Store(str(tmp_path / "store"))
    return store, stored(store, prepared_dir)


def ranged(store: Store, data: PreparedData, cache: Path) -> TokenizedSplits:
    return open_ranged(store, data.location, data.manifest, cache)


def test_ranged_reads_return_what_the_local_shards_hold(local, prepared_dir, tmp_path) -> None:
    store, data = local
    splits = ranged(store, data, tmp_path / "cache")
    here = TokenizedSplits.load(prepared_dir)
    blocks, truth = splits.train, here.train
    assert isinstance(blocks, RangedTokenBlocks) and blocks.shape == truth.shape and len(blocks) > 3 * SHARD_BLOCKS
    assert splits.stats() == here.stats() and blocks.rows_read == 0 and blocks.requests == 0
    n = len(truth)
    mask = np.zeros(n, dtype=bool)
    mask[[0, 7, n - 1]] = True
    for key in (3, -1, slice(2, 9), slice(1, 200, 7), np.array([9, 2, 2, 150, n - 1]), mask,
                (np.array([1, 2]), slice(0, 4)), (5, 3)):
        assert np.array_equal(blocks[key], truth[key]), key
        assert blocks[key].dtype == np.int32
    assert np.array_equal(np.asarray(splits.heldout), np.asarray(here.heldout))
    with pytest.raises(IndexError):
        blocks[n]


def test_one_read_per_run_of_consecutive_rows_and_only_those_rows(local, tmp_path) -> None:
    store, data = local
    blocks = ranged(store, data, tmp_path / "cache").train
    sizes = []
    real = store.read_ranges
    store.read_ranges = lambda location, ranges: sizes.extend(e - s for _, s, e in ranges) or real(location, ranges)
    blocks[np.array([20, 5, 6, 7, 5])]  # rows 5-7 in one read, 20 in another; 5 twice is read once
    assert blocks.requests == 2 and blocks.rows_read == 4 and sorted(sizes) == [32, 96]
    blocks[SHARD_BLOCKS - 1:SHARD_BLOCKS + 1]  # across a shard boundary: a read in each shard
    assert blocks.requests == 4 and blocks.rows_read == 6
    # Nothing of the corpus on local disk: only the checks of the two shards touched.
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert cached == ["train-00000.tokens.crc32", "train-00001.tokens.crc32"]


def test_a_damaged_block_is_read_again_then_refused(local, tmp_path) -> None:
    store, data = local
    blocks = ranged(store, data, tmp_path / "cache").train
    good = blocks[np.array([3, 4])]
    real, calls = store.read_ranges, []

    def once_damaged(location, ranges):
        out = real(location, ranges)
        calls.append(len(ranges))
        if len(calls) == 1:
            out[0] = bytes([out[0][0] ^ 1]) + out[0][1:]
        return out

    store.read_ranges = once_damaged
    assert np.array_equal(blocks[np.array([3, 4])], good) and calls == [1, 1]  # read again, then fine
    store.read_ranges = real
    shard = Path(store.root) / "_data" / "corpus" / "train-00000.tokens"
    raw = bytearray(shard.read_bytes())
    raw[4 * SEQ_LEN * 2] ^= 0xFF  # a bit flip in block 4, at rest
    shard.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=r"train-00000.tokens: blocks 3..4 do not match .*read twice.*"
                                             r"prepare the data again"):
        blocks[np.array([3, 4])]
    assert np.array_equal(blocks[5], TokenizedSplits.load(shard.parent).train[5])  # the rest still reads


def test_damaged_checks_are_refused_by_their_sha256(local, tmp_path) -> None:
    store, data = local
    checks = Path(store.root) / "_data" / "corpus" / "train-00001.tokens.crc32"
    checks.write_bytes(b"\0" * checks.stat().st_size)
    blocks = ranged(store, data, tmp_path / "cache").train
    blocks[3]  # shard 0 is fine
    with pytest.raises(IntegrityError, match=r"train-00001.tokens.crc32 is corrupt: sha256"):
        blocks[SHARD_BLOCKS + 3]
    assert not (tmp_path / "cache" / f"{data.manifest.hash}-checks" / checks.name).exists()


def test_a_cache_dir_that_cannot_hold_the_checks_says_so(local, tmp_path) -> None:
    store, data = local
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    blocks = ranged(store, data, tmp_path / "cache").train
    with pytest.raises(DataError, match=r"cannot keep the block checks .* point cache_dir at a writable"):
        blocks[0]
    assert (tmp_path / "cache").read_text().startswith("a file")


def test_read_ahead_reads_the_next_micro_batch_in_order_and_raises_where_asked() -> None:
    asked = []

    class Recording:
        shape = (100, 4)

        def __len__(self):
            return 100

        def __getitem__(self, rows):
            asked.append(int(rows[0]))
            if int(rows[0]) == 99:
                raise StoreError("endpoint gone")
            return np.tile(rows[:, None], (1, 4))

    order = lambda step, micro: np.array([step * 10 + micro])  # noqa: E731
    with ReadAhead(Recording(), order, grad_accum=2, last_step=3) as reader:
        for step in range(3):
            for micro in range(2):
                assert reader.rows(step, micro)[0, 0] == step * 10 + micro
    assert asked == [0, 1, 10, 11, 20, 21]  # each once, in order, none past the last step
    with ReadAhead(Recording(), lambda s, m: np.array([99 if s == 1 else 0]), 1, 5) as reader:
        reader.rows(0, 0)
        with pytest.raises(StoreError, match="endpoint gone"):
            reader.rows(1, 0)


def pico_settings(**over) -> TrainSettings:
    return TrainSettings(**{"steps": 4, "lr": 1e-3, "warmup_steps": 1, "seq_len": SEQ_LEN, "batch_size": 4,
                            "grad_accum": 2, "precision": "fp32", "device": "cpu", "log_every": 100, "seed": 3,
                            **over})

