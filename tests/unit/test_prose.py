"""The seed's pretraining corpus differs from the expert domains: no shared document, no
near-duplicate, and another kind of text, checked on the shipped configs' corpora. The detectors
are shown to fire on the old `general` corpus (made of the domains) and on a planted near-copy."""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

import pytest

from btx_core.config.load import load_config
from btx_core.config.schema import DataSource, SeedSpec
from btx_core.data.builtin.corpora import builtin_documents
from btx_core.data.sources import load_documents

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"
SHINGLE = 8  # words: a shared 8-word run is rare in unrelated English, certain in copied text
WORD = re.compile(r"[A-Za-z]+")


def shingles(doc: str) -> set[int]:
    words = doc.lower().split()
    return {hash(tuple(words[i:i + SHINGLE])) for i in range(len(words) - SHINGLE + 1)}


def word_distribution(docs: list[str]) -> dict[str, float]:
    counts = collections.Counter(w.lower() for d in docs for w in WORD.findall(d))
    total = sum(counts.values())
    return {w: c / total for w, c in counts.items()}


def jensen_shannon(p: dict[str, float], q: dict[str, float]) -> float:
    """In bits: 0 for the same distribution, 1 for disjoint vocabularies."""
    mean = {w: (p.get(w, 0.0) + q.get(w, 0.0)) / 2 for w in p.keys() | q.keys()}
    kl = lambda a: sum(v * math.log2(v / mean[w]) for w, v in a.items() if v > 0)  # noqa: E731
    return (kl(p) + kl(q)) / 2


@pytest.fixture(scope="module")
def corpora() -> tuple[list[str], dict[str, list[str]]]:
    """The seed's corpus and each domain's (training and held-out text alike) in configs/results.yaml."""
    config = load_config(CONFIGS / "results.yaml", check_environment=False)
    return (load_documents(config.seed.pretrain_data),
            {d.name: load_documents(d.data) for d in config.domains})


def shared_shingles(seed_docs: list[str], domain_docs: list[str]) -> tuple[int, int]:
    """(8-word runs of the domain found in the seed corpus, domain documents with at least 5 such)."""
    seen = set().union(*map(shingles, seed_docs))
    per_doc = [len(shingles(d) & seen) for d in domain_docs]
    return sum(per_doc), sum(n >= 5 for n in per_doc)


def test_the_seed_corpus_is_the_prose_corpus_in_every_shipped_config_and_by_default():
    assert SeedSpec.model_fields["pretrain_data"].default_factory() == DataSource(builtin="prose")
    for name in ("demo.yaml", "results.yaml"):
        config = load_config(CONFIGS / name, check_environment=False)
        assert config.seed.pretrain_data.builtin == "prose", name
        assert {d.data.builtin for d in config.domains} == {"code", "math", "knowledge"}


def test_prose_is_deduplicated_plain_text():
    docs = builtin_documents("prose")
    assert len(docs) > 1000 and len(set(docs)) == len(docs)
    assert not any(re.search(r"<[a-z/][^<>]*>|&[a-z]+;", d) for d in docs)
    sentences = [s for d in docs for s in re.split(r"(?<=[.;:?!])\s+", d.split("\n\n", 1)[1]) if len(s) > 60]
    assert len(set(sentences)) > 0.99 * len(sentences)  # repeated verses were dropped
    assert builtin_documents("prose", max_bytes=100_000, seed=1) != builtin_documents("prose", max_bytes=100_000)


def test_the_seed_corpus_shares_no_document_and_no_near_duplicate_with_any_domain(corpora):
    seed_docs, domains = corpora
    seed_set = set(seed_docs)
    for name, docs in domains.items():
        assert not seed_set & set(docs), name
        hits, near_copies = shared_shingles(seed_docs, docs)
        assert (hits, near_copies) == (0, 0), name
    # The detector is not blind: the old `general` corpus holds the domains' own documents...
    general = builtin_documents("general", max_bytes=600_000)
    hits, near_copies = shared_shingles(general, domains["knowledge"])
    assert near_copies > 10
    # ...and a copy of a seed document with every tenth word changed is found.
    words = seed_docs[3].split()
    edited = " ".join("zzz" if i % 10 == 0 else w for i, w in enumerate(words))
    assert shared_shingles(seed_docs, [edited])[1] == 1


def test_the_seed_corpus_is_another_kind_of_text(corpora):
    seed_docs, domains = corpora
    seed = word_distribution(seed_docs)
    # Two halves of the seed corpus differ little: the scale against which the domains differ.
    within = jensen_shannon(word_distribution(seed_docs[0::2]), word_distribution(seed_docs[1::2]))
    assert within < 0.1
    for name, docs in domains.items():
        between = jensen_shannon(seed, word_distribution(docs))
        assert between > 0.4 and between > 5 * within, (name, between, within)
    # Prose: letters and spaces, next to no code or formula symbols.
    text = "".join(seed_docs)
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.95
    assert sum(text.count(c) for c in "{}[]()=_#<>*/+0123456789") / len(text) < 0.005

