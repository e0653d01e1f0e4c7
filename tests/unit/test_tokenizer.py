"""The created seed's byte-level BPE tokenizer: exact round trips, HF layout, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from btx_core.data.builtin.corpora import builtin_documents
from btx_core.model.tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer

TRICKY = [
    "  leading spaces, trailing spaces  ",
    "\tdef f(a , b) :\n\t\treturn a+b  # tabs\r\n",
    "Café, naïve, 東京, emoji 😀, zero-width\u200bjoin",
    "x = 1 .  y = 2 ,z",  # spaces before punctuation must survive (no clean-up)
    "",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    docs = builtin_documents("general", max_bytes=400_000)
    out = tmp_path_factory.mktemp("tokenizer")
    return docs, out, train_tokenizer(docs, 1024, out)


def test_round_trip_is_exact(trained) -> None:
    docs, _, tok = trained
    code = builtin_documents("code", max_documents=5)
    math = builtin_documents("math", max_documents=20)
    for text in [*code, *math, *docs[:50], *TRICKY]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids or EOS_TOKEN in text


def test_saved_in_hf_layout_and_loads_offline(trained) -> None:
    _, out, tok = trained
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert loaded.eos_token == loaded.bos_token == EOS_TOKEN and loaded.pad_token == PAD_TOKEN
    assert loaded.eos_token_id != loaded.pad_token_id
    assert len(loaded) == len(tok) == 1024
    text = builtin_documents("code", max_documents=1)[0]
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    # No special tokens are added around a document: packing adds EOS itself.
    assert loaded("hello")["input_ids"] == loaded("hello", add_special_tokens=False)["input_ids"]


def test_learns_merges_from_the_corpus(trained) -> None:
    docs, _, tok = trained
    text = "".join(docs[:20])
    assert len(tok(text)["input_ids"]) < len(text.encode("utf-8")) / 2  # ~2.3 bytes per token at 1k vocab


def test_same_input_same_tokenizer(tmp_path: Path) -> None:
    docs = builtin_documents("math", max_documents=500)
    train_tokenizer(docs, 400, tmp_path / "a")
    train_tokenizer(docs, 400, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    b = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    assert a == b


def test_refuses_a_vocabulary_below_the_byte_alphabet(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer(["some text"], 200, tmp_path)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([], 1000, tmp_path)

