"""The unit tests of tests/integration/test_finetune.py, which holds their helpers and fixtures."""

import numpy as np
import pytest

from btx_core.data.prepare import SplitStats, TokenizedSplits
from btx_core.evaluation.scores import btm_logprobs, build_eval_sets
from btx_core.stages.finetune import build_mixture
from tests.integration.test_finetune import mixed  # noqa: F401 - fixtures


def test_btm_with_one_expert_is_that_expert():
    logp = np.log(np.random.default_rng(0).uniform(0.01, 1, size=(1, 5, 31))).astype(np.float32)
    assert np.allclose(btm_logprobs(logp, top_k=1), logp[0], atol=1e-6)
    assert np.allclose(btm_logprobs(logp, top_k=4), logp[0], atol=1e-6)


def test_btm_over_all_experts_is_the_bayesian_average_of_sequence_likelihoods():
    # With a uniform prior and every expert kept, the prefix posterior makes the ensemble's
    # sequence probability exactly the mean of the experts' sequence probabilities.
    rng = np.random.default_rng(1)
    logp = np.log(rng.uniform(0.05, 1, size=(3, 4, 20)))
    mixed = btm_logprobs(logp.astype(np.float32), top_k=3).astype(np.float64).sum(-1)
    expected = np.log(np.exp(logp.sum(-1)).mean(0))
    assert np.allclose(mixed, expected, atol=1e-4)


def test_btm_top1_follows_the_expert_that_explains_the_prefix():
    good, bad = np.full((1, 40), np.log(0.5)), np.full((1, 40), np.log(0.01))
    mixed = btm_logprobs(np.stack([bad, good]).astype(np.float32), top_k=1)
    assert mixed[0, 0] == pytest.approx(np.log((0.5 + 0.01) / 2), abs=1e-5)  # no evidence yet
    assert np.allclose(mixed[0, 1:], np.log(0.5), atol=1e-5)


def test_mixed_domain_blocks_splice_two_or_three_domains():
    heldout = {d: np.full((5, 64), i, dtype=np.int32) for i, d in enumerate(["a", "b", "c"])}
    sets = build_eval_sets(heldout, eval_blocks=3, mixed_blocks=20)
    assert {d: len(b) for d, b in sets.single.items()} == {"a": 3, "b": 3, "c": 3}
    assert np.array_equal(sets.mixed, sets.mixed_labels)  # token value = its domain here
    per_block = [len(np.unique(row)) for row in sets.mixed_labels]
    assert set(per_block) <= {2, 3} and 3 in per_block and 2 in per_block


def test_mixture_follows_its_weights():
    def splits(n, value):
        block = np.full((n, 8), value, dtype=np.int32)
        return TokenizedSplits(block, block[:2], SplitStats(0, 0, 0), SplitStats(0, 0, 0))

    mix = build_mixture({"a": splits(10, 0), "b": splits(300, 1)}, {"a": 0.5, "b": 0.5}, seed=0)
    shares = np.bincount(mix.train[:, 0]) / len(mix.train)
    assert len(mix.train) == 310 and np.allclose(shares, [0.5, 0.5], atol=0.01)
    assert mix.heldout[:, 0].tolist() == [0, 1, 0, 1]  # interleaved source by source

