"""Data: built-in corpora, loading files through `datasets`, the held-out split, packing,
saved splits and cache keys."""

from __future__ import annotations

import json
import os
import re
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from btx_core.config.schema import DataSource
from btx_core.data.builtin.corpora import (
    EXCLUDED_DIRS,
    builtin_documents,
    cap_documents,
    clean_html,
    interleave_by_bytes,
    stdlib_files,
)
from btx_core.data.packing import data_cache_key, pack, split_documents, token_stream
from btx_core.data.prepare import TokenizedSplits, prepare_domain_data
from btx_core.data.sources import load_documents
from btx_core.errors import DataError
from btx_core.model.tokenizer import train_tokenizer


def nbytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """datasets' Arrow cache in a temporary directory, never the user's home."""
    import datasets

    cache = tmp_path_factory.mktemp("hf-datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    # datasets reads the variable at import; its config attribute is what load_dataset uses.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    return cache


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    docs = builtin_documents("general", max_bytes=300_000)
    return train_tokenizer(docs, 600, tmp_path_factory.mktemp("tok"))


def with_specials(tokenizer, bos: str | None, eos: str):
    """The same vocabulary with other BOS/EOS tokens (added to the vocab when new), e.g. a
    Llama/Mistral-style `<s>` ... `</s>`, whose BOS differs from EOS."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                   pad_token="<|pad|>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def llama_style(tokenizer):
    tok = with_specials(tokenizer, "<s>", "</s>")
    assert tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id
    return tok


# ---------------------------------------------------------------------------------------------
# Built-in corpora


@pytest.mark.parametrize("name", ["code", "math", "knowledge", "general"])
def test_builtin_corpus_is_deterministic_and_capped(name: str) -> None:
    docs = builtin_documents(name, max_bytes=400_000)
    assert docs and all(isinstance(d, str) and d for d in docs)
    assert 300_000 < nbytes(docs) <= 400_000
    assert builtin_documents(name, max_bytes=400_000) == docs
    assert len(builtin_documents(name, max_documents=7)) == 7
    assert builtin_documents(name, max_bytes=400_000, seed=1) != docs


def test_code_corpus_is_the_stdlib_without_tests() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative)
    assert "json/decoder.py" in relative and "collections/__init__.py" in relative
    for rel in relative:
        assert not EXCLUDED_DIRS.intersection(rel.split("/")[:-1]), rel
    assert not any(r.startswith(("test/", "idlelib/idle_test/", "lib2to3/tests/")) for r in relative)
    docs = set(builtin_documents("code"))
    assert (root / "json" / "decoder.py").read_text(encoding="utf-8") in docs
    assert len(docs) > 300 and nbytes(list(docs)) > 5_000_000


def test_knowledge_is_clean_prose_by_country_section() -> None:
    docs = builtin_documents("knowledge")
    assert len(docs) > 2000 and nbytes(docs) > 5_000_000
    tag = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
    entity = re.compile(r"&(#\d+|[a-zA-Z]+);")
    for doc in docs:
        assert not tag.search(doc), tag.search(doc).group(0)
        assert not entity.search(doc), entity.search(doc).group(0)
        assert "  " not in doc and "\n\n\n" not in doc
    by_title = {d.split("\n", 1)[0]: d for d in docs}
    assert "France: Geography" in by_title and "Algeria: Introduction" in by_title
    assert "Mediterranean" in by_title["Algeria: Geography"]


def test_clean_html() -> None:
    text = "<p>One &amp; two&nbsp;&nbsp;three.</p> <p>Caf&eacute; <b>note:</b> &lt;5%<br>next</p>"
    assert clean_html(text) == "One & two three.\n\nCafé note: <5%\nnext"


def test_general_interleaves_the_domains_by_bytes() -> None:
    docs = builtin_documents("general", max_bytes=900_000)
    assert nbytes(docs) <= 900_000
    code = set(builtin_documents("code", max_bytes=300_000))
    math = set(builtin_documents("math", max_bytes=300_000))
    knowledge = set(builtin_documents("knowledge", max_bytes=300_000))
    shares = [nbytes([d for d in docs if d in part]) for part in (code, math, knowledge)]
    assert sum(shares) == nbytes(docs)  # nothing but the three domains
    assert min(shares) > 250_000
    # Any prefix is balanced too, so a capped pretraining run sees all three early on.
    first = docs[:60]
    assert all(any(d in part for d in first) for part in (code, math, knowledge))


def test_interleave_and_cap_rules() -> None:
    merged = list(interleave_by_bytes([["aaaa", "bb"], ["c", "d", "e"], []]))
    assert merged == ["aaaa", "c", "d", "e", "bb"]
    assert cap_documents(["aaa", "bbbbbb", "cc", "d"], max_bytes=6) == ["aaa", "cc", "d"]
    assert cap_documents(["a", "b", "c"], max_documents=2) == ["a", "b"]


def test_unknown_builtin_is_refused() -> None:
    with pytest.raises(DataError, match="use one of code, math"):
        builtin_documents("poetry")


# ---------------------------------------------------------------------------------------------
# Files through datasets


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_files_are_one_document_each(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("first line\nsecond line\n\nafter a blank")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "b.md").write_text("# Title\n\nbody\n")
    (tmp_path / "data" / ".hidden.txt").write_text("not data")
    (tmp_path / "data" / "README.md").write_text("about this dataset")
    docs = load_documents(DataSource(path=str(tmp_path / "data")))
    assert docs == ["first line\nsecond line\n\nafter a blank", "# Title\n\nbody\n"]
    assert load_documents(DataSource(path=str(tmp_path / "data" / "a.txt"))) == docs[:1]
    assert load_documents(DataSource(path=str(tmp_path / "data" / "*" / "*.md"))) == docs[1:]
    assert load_documents(DataSource(path=f"file://{tmp_path}/data/*.txt")) == docs[:1]


def test_jsonl_and_parquet_with_caps(tmp_path: Path) -> None:
    rows = [{"text": f"document number {i}", "id": i} for i in range(20)]
    write_jsonl(tmp_path / "part-0.jsonl", rows[:10])
    write_jsonl(tmp_path / "part-1.jsonl", rows[10:])
    texts = [r["text"] for r in rows]
    assert load_documents(DataSource(path=str(tmp_path))) == texts
    assert load_documents(DataSource(path=str(tmp_path), max_documents=3)) == texts[:3]
    capped = load_documents(DataSource(path=str(tmp_path), max_bytes=60))
    assert capped == texts[:3] and nbytes(capped) <= 60

    table = pa.table({"body": [f"row {i}" for i in range(5)], "n": list(range(5))})
    pq.write_table(table, tmp_path / "data.parquet")
    source = DataSource(path=str(tmp_path / "data.parquet"), text_column="body")
    assert load_documents(source) == [f"row {i}" for i in range(5)]


def test_format_can_be_given_for_unknown_extensions(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rows.data", [{"text": "x"}, {"text": "y"}])
    with pytest.raises(DataError, match="set `format`"):
        load_documents(DataSource(path=str(tmp_path / "rows.data")))
    assert load_documents(DataSource(path=str(tmp_path / "rows.data"), format="json")) == ["x", "y"]


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "*.jsonl"
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*matches no data files"):
        load_documents(DataSource(path=str(missing)))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(DataError, match="matches no data files"):
        load_documents(DataSource(path=str(tmp_path / "empty-dir")))


def test_empty_data_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_documents(DataSource(path=str(tmp_path / "empty.txt")))
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(DataError, match="no non-empty documents"):
        load_documents(DataSource(path=str(tmp_path / "blank.jsonl")))


def test_missing_text_column_lists_the_columns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rows.jsonl", [{"content": "a", "label": 1}])
    with pytest.raises(DataError, match="no column 'text'; its columns are content, label"):
        load_documents(DataSource(path=str(tmp_path / "rows.jsonl")))


def test_non_string_column_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rows.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(DataError, match="holds int values .* not text"):
        load_documents(DataSource(path=str(tmp_path / "rows.jsonl")))


def test_mixed_formats_need_a_choice(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "json doc"}])
    (tmp_path / "b.txt").write_text("text doc")
    with pytest.raises(DataError, match="mixes json and text"):
        load_documents(DataSource(path=str(tmp_path)))
    assert load_documents(DataSource(path=str(tmp_path), format="text")) == ["text doc"]


def test_unreadable_file_keeps_the_cause(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="could not load") as info:
        load_documents(DataSource(path=str(tmp_path / "broken.jsonl")))
    assert info.value.__cause__ is not None


def test_hub_dataset_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never reach the network here
    with pytest.raises(DataError, match="Hub dataset 'someone/not-here'.*network access") as info:
        load_documents(DataSource(hub="someone/not-here"))
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------------------------------------
# Split and pack


def test_split_is_deterministic_disjoint_and_order_free() -> None:
    docs = [f"doc {i}" for i in range(1000)]
    train, held = split_documents(docs, 0.1, salt="s")
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(docs)
    assert 60 < len(held) < 140
    assert split_documents(docs, 0.1, salt="s") == (train, held)
    shuffled = list(reversed(docs))
    train2, held2 = split_documents(shuffled, 0.1, salt="s")
    assert set(train2) == set(train) and set(held2) == set(held)
    assert set(split_documents(docs, 0.1, salt="other")[1]) != set(held)
    # A document's side does not depend on the rest of the corpus.
    assert set(split_documents(docs[:500], 0.1, salt="s")[1]) == {d for d in held if d in docs[:500]}


def test_split_keeps_both_sides_non_empty() -> None:
    for docs in (["a", "b"], ["a", "b", "c"]):
        for fraction in (0.001, 0.999):
            train, held = split_documents(docs, fraction, salt="s")
            assert train and held
    train, held = split_documents(["only"], 0.5, salt="s")
    assert train + held == ["only"]


def test_pack_places_eos_and_loses_only_the_tail(tokenizer) -> None:
    docs = ["def f(x):\n    return x + 1\n", "Problem: Compute 2 + 2.", "France: Geography"]
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    eos = tokenizer.eos_token_id
    assert tokenizer.bos_token_id == eos  # GPT-2 style: no BOS of its own, so none is added
    expected = [t for ids in encoded for t in (*ids, eos)]
    assert token_stream(docs, tokenizer).tolist() == expected
    blocks = pack(docs, tokenizer, seq_len=5)
    assert blocks.dtype == np.int32 and blocks.shape == (len(expected) // 5, 5)
    assert blocks.reshape(-1).tolist() == expected[: blocks.size]
    assert len(expected) - blocks.size < 5


def test_pack_opens_each_document_with_a_distinct_bos(llama_style) -> None:
    docs = ["def f(x):\n    return x + 1\n", "Problem: Compute 2 + 2.", "France: Geography"]
    bos, eos = llama_style.bos_token_id, llama_style.eos_token_id
    encoded = [llama_style(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert all(bos not in ids and eos not in ids for ids in encoded)
    stream = token_stream(docs, llama_style).tolist()
    assert stream == [t for ids in encoded for t in (bos, *ids, eos)]
    ends = [i for i, t in enumerate(stream) if t == eos]
    starts = [0] + [i + 1 for i in ends[:-1]]
    assert len(ends) == len(docs) and ends[-1] == len(stream) - 1
    for start, end, ids in zip(starts, ends, encoded, strict=True):
        assert stream[start] == bos and stream[start + 1:end] == ids
    blocks = pack(docs, llama_style, seq_len=4)
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]


def test_pack_adds_no_bos_when_it_is_missing_or_equals_eos(tokenizer) -> None:
    docs = ["a short one", "a somewhat longer document than the first"]
    expected = token_stream(docs, tokenizer).tolist()
    eos = tokenizer.eos_token
    for tok in (with_specials(tokenizer, None, eos), with_specials(tokenizer, eos, eos)):
        assert token_stream(docs, tok).tolist() == expected
    assert expected.count(tokenizer.eos_token_id) == len(docs)


def test_pack_ignores_padding_left_on_the_tokenizer(tokenizer) -> None:
    docs = ["a short one", "a somewhat longer document than the first"]
    before = token_stream(docs, tokenizer).tolist()
    tokenizer(docs, padding=True)  # transformers leaves padding switched on in the backend
    tokenizer.backend_tokenizer.enable_truncation(3)
    try:
        assert token_stream(docs, tokenizer).tolist() == before
    finally:
        tokenizer.backend_tokenizer.no_truncation()
        tokenizer.backend_tokenizer.no_padding()


def test_prepare_writes_shards_that_open_lazily(tokenizer, tmp_path: Path) -> None:
    source = DataSource(builtin="math", max_documents=400)
    splits = prepare_domain_data(source, tokenizer, seq_len=64, held_out_fraction=0.1, salt="math",
                                 directory=tmp_path / "splits")
    assert splits.train.shape[1] == splits.heldout.shape[1] == 64
    stats = splits.stats()
    assert stats["train"]["documents"] + stats["heldout"]["documents"] == 400
    assert stats["train"]["blocks"] == len(splits.train) and stats["seq_len"] == 64
    assert stats["train"]["tokens"] - 64 < stats["train"]["blocks"] * 64 <= stats["train"]["tokens"]
    loaded = TokenizedSplits.load(tmp_path / "splits")
    assert loaded.train.rows_read == 0 and loaded.stats() == stats
    assert np.array_equal(np.asarray(loaded.train), np.asarray(splits.train))
    assert loaded.train[3].dtype == np.int32
    names = sorted(p.name for p in (tmp_path / "splits").iterdir())
    assert names == ["heldout-00000.tokens", "heldout-00000.tokens.crc32", "index.json", "train-00000.tokens",
                     "train-00000.tokens.crc32"]  # nothing to unpickle
    checks = np.frombuffer((tmp_path / "splits" / "train-00000.tokens.crc32").read_bytes(), dtype="<u4")
    dtype = np.dtype(json.loads((tmp_path / "splits" / "index.json").read_text())["dtype"])
    stored = np.fromfile(tmp_path / "splits" / "train-00000.tokens", dtype=dtype).reshape(-1, 64)
    assert len(checks) == len(splits.train)
    assert all(int(checks[i]) == zlib.crc32(stored[i].tobytes()) for i in range(len(checks)))


def test_load_refuses_incomplete_or_inconsistent_data(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        TokenizedSplits.load(tmp_path)
    prepare_domain_data(DataSource(builtin="math", max_documents=200), tokenizer, 32, 0.1, "s", tmp_path / "d")
    shard = tmp_path / "d" / "train-00000.tokens"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="the index says"):
        TokenizedSplits.load(tmp_path / "d")
    (tmp_path / "d" / "index.json").write_text("garbage")
    with pytest.raises(DataError, match="unreadable"):
        TokenizedSplits.load(tmp_path / "d")


def test_too_little_data_for_a_block_says_what_to_do(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="lower seq_len, add data"):
        prepare_domain_data(DataSource(builtin="math", max_documents=20), tokenizer, 4096, 0.1, "s",
                            tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_one_document_cannot_be_split(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("a single long document " * 100)
    with pytest.raises(DataError, match="at least 2"):
        prepare_domain_data(DataSource(path=str(tmp_path / "one.txt")), tokenizer, 16, 0.1, "s", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Cache keys


def test_cache_key_changes_with_every_input(tmp_path: Path) -> None:
    base = dict(source=DataSource(builtin="code"), tokenizer_id="t", seq_len=128,
                held_out_fraction=0.05, salt="code")
    key = data_cache_key(**base)
    assert key == data_cache_key(**base) and re.fullmatch(r"[0-9a-f]{64}", key)
    changes = [dict(source=DataSource(builtin="math")),
               dict(source=DataSource(builtin="code", max_bytes=10)), dict(tokenizer_id="u"),
               dict(seq_len=256), dict(held_out_fraction=0.1), dict(salt="x")]
    for change in changes:
        assert data_cache_key(**{**base, **change}) != key, change


def test_cache_key_sees_changed_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    source = DataSource(path=str(tmp_path))
    key = data_cache_key(source, "t", 16, 0.1, "s")
    assert data_cache_key(source, "t", 16, 0.1, "s") == key
    write_jsonl(path, [{"text": "a"}, {"text": "b"}])
    os.utime(path, ns=(1, 1))
    assert data_cache_key(source, "t", 16, 0.1, "s") != key

