"""From documents to training blocks: the held-out split, tokenization, packing, and a cache key.
These are the definitions, on lists in memory; btx_core/data/prepare.py runs the same steps on
a corpus of any size, in parallel.

Packing follows standard LM pretraining (and the paper's continued pretraining): documents
are tokenized, each preceded by BOS (when the tokenizer has one distinct from EOS, as Llama and
Mistral do) and followed by EOS, concatenated, and cut into full `seq_len` blocks; the
ragged tail is dropped, so every block is a full-length training example and no padding is
ever trained on. The held-out split is made per document, before packing, so that no block
mixes train and held-out text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from btx_core.config.schema import DataSource, stable_hash
from btx_core.data.sources import source_fingerprint
from btx_core.errors import DataError

# Bump when splitting or packing changes, so cached blocks are rebuilt.
# 2: BOS before each document when the tokenizer's BOS != EOS; 3: token shards (data/shards.py);
# 4: each shard's per-block CRC-32s beside it (read back block by block from S3: data/ranged.py).
DATA_FORMAT_VERSION = 4
ENCODE_BATCH = 1000  # documents per tokenizer call: bounds the Python lists held at once


def split_documents(docs: Sequence[str], held_out_fraction: float,
                    salt: str) -> tuple[list[str], list[str]]:
    """(train, held-out). A document's side depends only on its text and `salt`, so the split
    is the same in any order and across corpora that share documents; identical documents
    never straddle it. With two or more documents each side gets at least one. (The reference
    for the parallel split of btx_core/data/prepare.py, which uses the same two functions.)"""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be between 0 and 1, got {held_out_fraction}")
    positions = np.array([position(doc, salt) for doc in docs], dtype=np.float64)
    held = held_out_mask(positions, held_out_fraction, both_sides=True)
    train = [doc for doc, h in zip(docs, held, strict=True) if not h]
    heldout = [doc for doc, h in zip(docs, held, strict=True) if h]
    return train, heldout


def position(doc: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the document's text."""
    digest = hashlib.sha256(salt.encode() + b"\0" + doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out_mask(positions: np.ndarray, held_out_fraction: float, *, both_sides: bool) -> np.ndarray:
    """Which documents are held out, from their positions. `both_sides` (a whole corpus of two or
    more documents) moves the lowest-placed document(s) to held-out if none is, and the
    highest-placed to train if all are; every copy of a document moves with it."""
    held = positions < held_out_fraction
    if both_sides and len(positions) >= 2:
        if not held.any():
            held |= positions == positions.min()
        if held.all():
            held &= positions != positions.max()
    return held


def token_stream(docs: Sequence[str], tokenizer) -> np.ndarray:
    """All documents' tokens as one int32 array: each document as [BOS,] tokens..., EOS.

    BOS is prepended only when the tokenizer has one that differs from EOS: Llama and Mistral
    were pretrained with BOS opening every document, and continued pretraining without it is off
    their distribution. GPT-2-style tokenizers (the demo's) set BOS == EOS, where the previous
    document's EOS already marks the start, so a second copy would only waste a token.
    """
    head, eos = bos_eos(tokenizer)
    backend = plain_backend(tokenizer)
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


def bos_eos(tokenizer) -> tuple[tuple[int, ...], int]:
    """(BOS to open each document, or nothing; EOS to close it)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which separates packed documents: use a "
                        "tokenizer with `eos_token` set")
    bos = tokenizer.bos_token_id
    return ((bos,) if bos is not None and bos != eos else ()), eos


def plain_backend(tokenizer):
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
