"""From documents to training blocks: a held-out split, tokenization, packing, and a cache key.

Packing follows standard LM pretraining (and the paper's continued pretraining): documents
are tokenized, each preceded by BOS (when the tokenizer has one distinct from EOS, as Llama and
Mistral do) and followed by EOS, concatenated, and cut into full `seq_len` blocks; the
ragged tail is dropped, so every block is a full-length training example and no padding is
ever trained on. The held-out split is made per document, before packing, so that no block
mixes train and held-out text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from btx_core.config.schema import DataSource, stable_hash
from btx_core.data.sources import load_documents, source_fingerprint
from btx_core.errors import DataError

# Bump when splitting or packing changes, so cached blocks are rebuilt.
DATA_FORMAT_VERSION = 2  # 2: BOS before each document when the tokenizer's BOS != EOS
SPLITS_FILE = "splits.safetensors"
STATS_FILE = "stats.json"
ENCODE_BATCH = 1000  # documents per tokenizer call: bounds the Python lists held at once


def split_documents(docs: Sequence[str], held_out_fraction: float,
                    salt: str) -> tuple[list[str], list[str]]:
    """(train, held-out). A document's side depends only on its text and `salt`, so the split
    is the same in any order and across corpora that share documents; identical documents
    never straddle it. With two or more documents each side gets at least one."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be between 0 and 1, got {held_out_fraction}")
    positions = [_position(doc, salt) for doc in docs]
    held = [p < held_out_fraction for p in positions]
    if len(docs) >= 2 and not any(held):
        held[positions.index(min(positions))] = True
    if len(docs) >= 2 and all(held):
        held[positions.index(max(positions))] = False
    train = [doc for doc, h in zip(docs, held, strict=True) if not h]
    heldout = [doc for doc, h in zip(docs, held, strict=True) if h]
    return train, heldout


def _position(doc: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the document's text."""
    digest = hashlib.sha256(salt.encode() + b"\0" + doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def token_stream(docs: Sequence[str], tokenizer) -> np.ndarray:
    """All documents' tokens as one int32 array: each document as [BOS,] tokens..., EOS.

    BOS is prepended only when the tokenizer has one that differs from EOS: Llama and Mistral
    were pretrained with BOS opening every document, and continued pretraining without it is off
    their distribution. GPT-2-style tokenizers (the demo's) set BOS == EOS, where the previous
    document's EOS already marks the start, so a second copy would only waste a token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which separates packed documents: use a "
                        "tokenizer with `eos_token` set")
    bos = tokenizer.bos_token_id
    head = (bos,) if bos is not None and bos != eos else ()
    backend = _plain_backend(tokenizer)
    pieces = []
    for start in range(0, len(docs), ENCODE_BATCH):
        batch = list(docs[start:start + ENCODE_BATCH])
        if backend is not None:
            # The Rust batch encoder without offsets: a third faster than the transformers call.
            ids = [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
        else:
            ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)["input_ids"]
        pieces.append(np.fromiter((t for doc_ids in ids for t in (*head, *doc_ids, eos)),
                                  dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def _plain_backend(tokenizer):
    """A copy of the fast tokenizer's Rust backend with padding and truncation off: transformers
    leaves them set on the backend after a padded call, and either would corrupt packing."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if backend.padding is None and backend.truncation is None:
        return backend
    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def pack(docs: Sequence[str], tokenizer, seq_len: int) -> np.ndarray:
    """int32 array [n_blocks, seq_len]: the token stream cut into full blocks, tail dropped."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return _blocks(token_stream(docs, tokenizer), seq_len)


def _blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n_blocks = len(stream) // seq_len
    return stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)


@dataclass(frozen=True)
class SplitStats:
    documents: int
    """Documents in the split."""
    tokens: int
    """Tokens before cutting into blocks, each document's EOS (and BOS, if any) included."""
    blocks: int
    """Full blocks of seq_len tokens (the ragged tail is dropped)."""


@dataclass(frozen=True)
class TokenizedSplits:
    """A domain's packed train and held-out blocks, int32 [n_blocks, seq_len] each."""

    train: np.ndarray
    heldout: np.ndarray
    train_stats: SplitStats
    heldout_stats: SplitStats

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    def stats(self) -> dict[str, dict[str, int] | int]:
        """JSON-ready numbers for manifests and logs."""
        return {"seq_len": self.seq_len, "train": asdict(self.train_stats),
                "heldout": asdict(self.heldout_stats)}

    def save(self, directory: str | Path) -> None:
        """Blocks as safetensors, numbers as JSON: nothing a loader has to execute."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"train": np.ascontiguousarray(self.train, dtype=np.int32),
                   "heldout": np.ascontiguousarray(self.heldout, dtype=np.int32)},
                  str(directory / SPLITS_FILE), metadata={"format_version": str(DATA_FORMAT_VERSION)})
        (directory / STATS_FILE).write_text(json.dumps(self.stats(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> TokenizedSplits:
        directory = Path(directory)
        missing = [name for name in (SPLITS_FILE, STATS_FILE) if not (directory / name).is_file()]
        if missing:
            raise DataError(f"{directory} is not saved tokenized data: {', '.join(missing)} missing; "
                            "prepare the data again")
        try:
            arrays = load_file(str(directory / SPLITS_FILE))
            stats = json.loads((directory / STATS_FILE).read_text())
            splits = cls(arrays["train"], arrays["heldout"], SplitStats(**stats["train"]),
                         SplitStats(**stats["heldout"]))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise DataError(f"tokenized data in {directory} is unreadable ({exc}); delete it and "
                            "prepare the data again") from exc
        for name in ("train", "heldout"):
            array, expected = getattr(splits, name), getattr(splits, f"{name}_stats").blocks
            if array.dtype != np.int32 or array.ndim != 2 or len(array) != expected:
                raise DataError(f"{name} blocks in {directory} do not match {STATS_FILE} "
                                f"({array.dtype}, shape {array.shape}, expected {expected} blocks); "
                                "delete the directory and prepare the data again")
        if splits.heldout.shape[1] != splits.train.shape[1]:
            raise DataError(f"train and held-out blocks in {directory} differ in length; "
                            "prepare the data again")
        return splits


def prepare_domain_data(source: DataSource, tokenizer, seq_len: int, held_out_fraction: float,
                        salt: str, *, cache_dir: str | None = None) -> TokenizedSplits:
    """Load, split, tokenize and pack one domain's data."""
    docs = load_documents(source, cache_dir=cache_dir)
    if len(docs) < 2:
        raise DataError(f"{_describe(source)} has {len(docs)} document; a held-out split needs at "
                        "least 2 (one text file is one document: split it into several files, or "
                        "use jsonl with one document per line)")
    train_docs, heldout_docs = split_documents(docs, held_out_fraction, salt)
    splits = {}
    for name, part in (("train", train_docs), ("held-out", heldout_docs)):
        stream = token_stream(part, tokenizer)
        blocks = _blocks(stream, seq_len)
        if len(blocks) == 0:
            raise DataError(f"the {name} split of {_describe(source)} has {len(part)} documents and "
                            f"{len(stream)} tokens, not one full block of seq_len {seq_len}: lower "
                            "seq_len, add data (raise max_bytes), or change held_out_fraction")
        splits[name] = (blocks, SplitStats(len(part), len(stream), len(blocks)))
    (train, train_stats), (heldout, heldout_stats) = splits["train"], splits["held-out"]
    return TokenizedSplits(train, heldout, train_stats, heldout_stats)


def _describe(source: DataSource) -> str:
    if source.builtin is not None:
        return f"built-in corpus {source.builtin!r}"
    return f"path {source.path!r}" if source.path is not None else f"Hub dataset {source.hub!r}"


# ---------------------------------------------------------------------------------------------
# Cache keys


def data_cache_key(source: DataSource, tokenizer_id: str, seq_len: int,
                   held_out_fraction: float, salt: str) -> str:
    """sha256 naming the prepared data: every input of `prepare_domain_data`, plus what the
    source's content depends on (corpus versions, file sizes and stamps). `tokenizer_id` must
    change with anything that changes tokenization, BOS/EOS included (`data.cache.tokenizer_id`
    hashes tokenizer.json and tokenizer_config.json)."""
    return stable_hash({
        "format_version": DATA_FORMAT_VERSION,
        "source": source.model_dump(mode="json"),
        "content": source_fingerprint(source),
        "tokenizer": tokenizer_id,
        "seq_len": seq_len,
        "held_out_fraction": held_out_fraction,
        "salt": salt,
    })
