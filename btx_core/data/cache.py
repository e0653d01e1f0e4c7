"""Prepared (tokenized, packed, split) corpora, cached in the store.

A retried branch, or a branch on another machine, finds its domain's token shards in the store
and does not tokenize again. A prepared corpus is named by everything that goes into it (source,
tokenizer, sequence length, held-out fraction, split salt) and identified downstream by its
content: a stage records the sha256s of the blocks it trained on, so an expert is retrained
when its data really changed, and only then.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from btx_core.config.schema import DataSource, stable_hash
from btx_core.data.packing import data_cache_key
from btx_core.data.prepare import TokenizedSplits, prepare_domain_data
from btx_core.data.ranged import open_ranged
from btx_core.data.shards import ShardIndex
from btx_core.model.dense import load_tokenizer
from btx_core.model.families import TOKENIZER_FILES
from btx_core.store import layout
from btx_core.store.core import Manifest, Store
from btx_core.store.manifest import FileEntry

# One salt for every stage: a document lands on the same side of the train/held-out split in the
# seed's general corpus and in its domain, so no domain's held-out text is seen in pretraining.
SPLIT_SALT = "btx-split-1"


def tokenizer_id(model_manifest: Manifest) -> str:
    """The tokenizer of a stored model, from its manifest's hashes: nothing to download."""
    return stable_hash({f: model_manifest.files[f].sha256 for f in TOKENIZER_FILES
                        if f in model_manifest.files})


def content_id(manifest: Manifest) -> str:
    """What an output holds, independent of when it was written."""
    return stable_hash({rel: entry.sha256 for rel, entry in manifest.files.items()})


class PreparedData(NamedTuple):
    """A prepared corpus in the store: where it is and its manifest."""

    location: str
    manifest: Manifest

    @property
    def content_id(self) -> str:
        return content_id(self.manifest)

    def load(self, store: Store, cache_dir: Path) -> TokenizedSplits:
        """The splits, opened lazily (nothing read yet): from the store itself with ranged reads
        (an object store, `store_transfer.prepared_data: ranged`), else from a verified local copy
        (a local store's own directory, or a download into `cache_dir`)."""
        if not store.is_local and store.transfer.prepared_data == "ranged":
            return open_ranged(store, self.location, self.manifest, cache_dir)
        return TokenizedSplits.load(store.fetch(self.location, cache_dir))


def ensure_prepared(store: Store, source: DataSource, *, store_root: str, tokenizer: str,
                    tokenizer_dir: Callable[[], Path], seq_len: int, held_out_fraction: float,
                    cache_dir: Path) -> PreparedData:
    """The prepared corpus in the store, tokenizing it first if it is not there yet.

    `store_root` is the store's root as the config names it (`config.store`): the runs in a
    store share its prepared corpora. `tokenizer` identifies the tokenizer (`tokenizer_id`);
    `tokenizer_dir` is called only when the corpus must be prepared, so a cached corpus never
    needs the model fetched.
    """
    key = data_cache_key(source, tokenizer, seq_len, held_out_fraction, SPLIT_SALT)
    location = layout.data_cache(store_root, key)
    if not store.is_complete(location):
        with tempfile.TemporaryDirectory(prefix="btx-data-", dir=_made(cache_dir)) as tmp:
            splits = prepare_domain_data(source, load_tokenizer(str(tokenizer_dir())), seq_len,
                                         held_out_fraction, SPLIT_SALT, Path(tmp) / "data",
                                         tokenizer_id=tokenizer, cache_dir=tmp)
            # The shards were hashed as they were written; a local store takes them by rename.
            index = ShardIndex.read(Path(tmp) / "data")
            known = {s.name: FileEntry(size=(Path(tmp) / "data" / s.name).stat().st_size, sha256=s.sha256)
                     for split in index.splits.values() for s in split.shards}
            store.write_dir(Path(tmp) / "data", location, stage="data", config_hash=key, known=known,
                            move=True, metrics={"tokenizer": tokenizer, "train": asdict(splits.train_stats),
                                                "heldout": asdict(splits.heldout_stats)})
    return PreparedData(location, store.read_manifest(location))


def _made(directory: Path) -> Path:
    # Preparation's temporary files next to the cache, not in a small /tmp: a chunk of text and
    # its tokens, and the shards until the store has them.
    directory.mkdir(parents=True, exist_ok=True)
    return directory
