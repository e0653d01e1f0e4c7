"""The held-out evaluation sets: seeded random blocks from all of a domain's held-out blocks (not the
first few documents), the same for a seed, recorded, and never a training block."""

from __future__ import annotations

import json
import re

import numpy as np

from btx_core.config.schema import DataSource
from btx_core.data.packing import split_documents
from btx_core.data.prepare import prepare_domain_data
from btx_core.evaluation.scores import build_eval_sets
from btx_core.model.tokenizer import train_tokenizer
from tests.unit.test_data import write_jsonl


def numbered(n: int, seq_len: int = 16, offset: int = 0) -> np.ndarray:
    """Blocks whose every token is the block's own index (plus `offset`): a block names itself."""
    return np.repeat(np.arange(offset, offset + n, dtype=np.int32)[:, None], seq_len, axis=1)


def test_single_domain_blocks_are_a_seeded_sample_spread_over_all_held_out_blocks():
    heldout = {"a": numbered(1000), "b": numbered(300, offset=5000)}
    sets = build_eval_sets(heldout, eval_blocks=64, mixed_blocks=8, seed=7)
    picked = sets.single_blocks["a"]
    assert len(picked) == len(set(picked)) == 64
    assert picked != list(range(64))  # not the first blocks
    assert min(picked) < 250 and max(picked) > 750  # from the whole range
    # Each quarter of the held-out blocks gets a share near its quarter of the sample.
    assert all(6 <= sum(q * 250 <= i < (q + 1) * 250 for i in picked) <= 26 for q in range(4))
    # The recorded indices are the blocks scored.
    assert sets.single["a"][:, 0].tolist() == picked
    assert (sets.single["b"][:, 0] - 5000).tolist() == sets.single_blocks["b"]


def test_the_sample_is_fixed_by_the_seed_and_recorded():
    heldout = {"a": numbered(500), "b": numbered(500, offset=1000), "c": numbered(40, offset=2000)}
    one = build_eval_sets(heldout, eval_blocks=64, mixed_blocks=16, seed=1)
    again = build_eval_sets(heldout, eval_blocks=64, mixed_blocks=16, seed=1)
    other = build_eval_sets(heldout, eval_blocks=64, mixed_blocks=16, seed=2)
    assert one.describe() == again.describe()
    assert np.array_equal(one.mixed, again.mixed)
    assert one.single_blocks["a"] != other.single_blocks["a"]
    assert one.describe()["mixed_sources"] != other.describe()["mixed_sources"]
    assert len(one.single["c"]) == 40  # a domain with fewer blocks: all of them
    # A domain's sample does not depend on which other domains are evaluated.
    alone = build_eval_sets({"a": heldout["a"]}, eval_blocks=64, mixed_blocks=16, seed=1)
    assert alone.single_blocks["a"] == one.single_blocks["a"]
    described = json.loads(json.dumps(one.describe()))  # JSON-ready for results.json
    assert described["seed"] == 1 and described["heldout_blocks"] == {"a": 500, "b": 500, "c": 40}
    # Every spliced segment says where it came from, and that is what the mixed block holds.
    for row, segments in enumerate(described["mixed_sources"]):
        assert 2 <= len(segments) <= 3
        for domain, block, offset, start, end in segments:
            source = heldout[domain][block]
            assert np.array_equal(one.mixed[row, start:end], source[offset:offset + end - start])
            assert (one.mixed_labels[row, start:end] == one.domains.index(domain)).all()
    blocks_used = {(d, b) for segments in described["mixed_sources"] for d, b, *_ in segments}
    assert max(b for d, b in blocks_used if d == "a") > 250  # the mixed set's sources spread too


def test_sampled_blocks_come_from_held_out_documents_only(tmp_path):
    # Every document repeats its own number, so any stretch of a block names the documents it is from.
    docs = [" ".join([f"doc{i:04d}"] * 12) for i in range(2000)]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    tokenizer = train_tokenizer(docs, 300, tmp_path / "tok")
    splits = prepare_domain_data(DataSource(path=str(tmp_path / "docs.jsonl")), tokenizer, 32, 0.1, "salt",
                                 tmp_path / "prep", num_proc=1)
    _, held_docs = split_documents(docs, 0.1, "salt")
    held = {int(d[3:7]) for d in held_docs}
    assert len(splits.heldout) > 128
    sets = build_eval_sets({"d": splits.heldout, "e": splits.heldout}, eval_blocks=64, mixed_blocks=16, seed=3)
    # Each single block, and each segment of a spliced block on its own (two segments side by side
    # could spell a number neither holds).
    pieces = [*sets.single["d"], *(sets.mixed[row, s.start:s.end] for row, segments in
                                   enumerate(sets.mixed_sources) for s in segments)]
    seen = set()
    for piece in pieces:
        ids = {int(m) for m in re.findall(r"doc(\d{4})", tokenizer.decode(piece.tolist()))}
        assert ids <= held, sorted(ids - held)
        seen |= ids
    assert max(seen) - min(seen) > 1000  # from all over the held-out documents

