"""Prepared-corpus identity: the tokenizer from a manifest, the content independent of time."""

import json

from btx_core.data.cache import content_id, tokenizer_id
from btx_core.store.core import Store


def write(store, tmp_path, name, files):
    src = tmp_path / name
    src.mkdir()
    for rel, text in files.items():
        (src / rel).write_text(text)
    return store.write_dir(src, store.child(name), stage="t", config_hash="h")


def test_tokenizer_id_follows_tokenizer_files_only(tmp_path):
    store = Store(str(tmp_path / "store"))
    tok = {"tokenizer.json": "{}", "tokenizer_config.json": json.dumps({"bos_token": "<s>"})}
    a = write(store, tmp_path, "a", {**tok, "model.safetensors": "weights-a"})
    b = write(store, tmp_path, "b", {**tok, "model.safetensors": "weights-b"})
    c = write(store, tmp_path, "c", {**tok, "tokenizer_config.json": json.dumps({"bos_token": None})})
    assert tokenizer_id(a) == tokenizer_id(b)       # other weights, same tokenizer
    assert tokenizer_id(a) != tokenizer_id(c)       # a BOS change changes how data is packed


def test_content_id_ignores_when_an_output_was_written(tmp_path):
    store = Store(str(tmp_path / "store"))
    first = write(store, tmp_path, "one", {"splits.safetensors": "blocks"})
    again = write(store, tmp_path, "two", {"splits.safetensors": "blocks"})
    other = write(store, tmp_path, "three", {"splits.safetensors": "other blocks"})
    assert content_id(first) == content_id(again)
    assert content_id(first) != content_id(other)

