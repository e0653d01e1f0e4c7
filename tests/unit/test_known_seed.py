"""configs/results-known-seed.yaml, the toy table on a seed that knows its domains (issue 24): the
seed reads text of each domain's kind, yet no document of any evaluation set, on the real
corpora the config names (not a sample of them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from btx_core.config.load import load_config
from btx_core.data.cache import SPLIT_SALT
from btx_core.data.packing import split_documents
from btx_core.data.sources import load_documents

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"


@pytest.fixture(scope="module")
def config():
    return load_config(CONFIGS / "results-known-seed.yaml", check_environment=False)


def test_it_is_the_toy_table_with_only_the_seeds_corpus_and_the_bar_changed(config):
    toy = load_config(CONFIGS / "results.yaml", check_environment=False)
    assert config.seed.pretrain_data.builtin == "general" and toy.seed.pretrain_data.builtin == "prose"
    assert config.compare.seed_below_uniform == 2.0 and toy.compare.seed_below_uniform is None
    same = lambda c: c.model_dump(exclude={"run_name": True, "seed": {"pretrain_data"},  # noqa: E731
                                           "compare": {"seed_below_uniform"}})
    assert same(config) == same(toy)


def test_the_seed_trains_on_no_document_of_any_domains_held_out_split(config):
    seed_docs = load_documents(config.seed.pretrain_data)
    seed_train, _ = split_documents(seed_docs, config.seed.held_out_fraction, SPLIT_SALT)
    seen = set(seed_train)
    for domain in config.domains:
        assert domain.held_out_fraction <= config.seed.held_out_fraction, domain.name
        docs = load_documents(domain.data)
        train, held_out = split_documents(docs, domain.held_out_fraction, SPLIT_SALT)
        assert len(held_out) >= 10, (domain.name, len(held_out))  # not vacuous (code: 15 files)
        assert not seen & set(held_out), f"{domain.name}: held-out documents in the seed's training split"
        # ... while the seed does read text of the domain's kind: most of its training documents
        assert len(seen & set(train)) > 0.5 * len(train), domain.name


def test_the_check_fires_when_the_seed_holds_out_less_than_a_domain(config):
    """The overlap check is not vacuous: a seed holding out 1 % where the domain holds out 5 %
    trains on some of the domain's held-out documents."""
    seed_train, _ = split_documents(load_documents(config.seed.pretrain_data), 0.01, SPLIT_SALT)
    knowledge = next(d for d in config.domains if d.name == "knowledge")
    _, held_out = split_documents(load_documents(knowledge.data), knowledge.held_out_fraction, SPLIT_SALT)
    assert set(seed_train) & set(held_out)
