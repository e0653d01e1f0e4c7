"""Model cards the Hugging Face Hub accepts, checked offline with huggingface_hub's own parsers:
base_model a Hub repo id or absent (never a store location), the store lineage under `btx:` without
credentials, the recipe, and the held-out table also as a `model-index` the Hub can read. And the
store's `amend`, which gives a finished model's card its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from btx_core.model.card import (
    evaluation_markdown,
    hub_id,
    model_index,
    public_location,
    seed_lineage,
    split_card,
    with_evaluation,
    write_finetune_card,
    write_model_card,
)
from btx_core.moe.mix import Expert, MixOptions

# What the Hub's own model card spec allows as base_model_relation.
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
DOMAINS = ["math", "code"]


def hub_accepts(text: str) -> dict:
    """The checks the Hub's metadata validation makes that can be made offline, through
    huggingface_hub: the card parses (`ModelCard`: YAML block a dict, `model-index` through
    `model_index_to_eval_results`, eval results complete), base_model holds repo ids, the
    relation is a known one and needs a base_model. Returns the front matter."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from huggingface_hub.utils import validate_repo_id

    card = ModelCard(text)
    meta = split_card(text)[0]
    assert meta and card.data.to_dict().keys() - {"model-index"} <= meta.keys()
    bases = meta.get("base_model")
    for base in bases if isinstance(bases, list) else [bases] if bases else []:
        validate_repo_id(base)  # raises HFValidationError for a path or a URI
        assert not Path(base).is_absolute() and "://" not in base
    if "base_model_relation" in meta:
        assert bases and meta["base_model_relation"] in RELATIONS, meta
    if "model-index" in meta:
        name, results = model_index_to_eval_results(meta["model-index"])
        assert name == card.data.model_name and results == card.data.eval_results
    return meta


def results() -> dict:
    """The evaluate stage's losses (btx_core/stages/evaluate.py), two domains."""
    def losses(math_, code, mixed):
        return {"single": {"math": math_, "code": code}, "average": (math_ + code) / 2, "mixed": mixed}

    return {"seed": losses(3.0, 3.2, 3.3), "expert:math": losses(2.5, 3.4, 3.2), "expert:code": losses(3.3, 2.6, 3.2),
            "btx-mix": losses(2.9, 2.9, 3.0), "btx": losses(2.6, 2.7, 2.8), "btm-top1": losses(2.55, 2.65, 2.95)}


def test_hub_ids_and_what_is_not_one(tmp_path):
    assert hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for not_hub in ("/abs/store/ci/mix/model", "s3://bucket/runs/ci/mix/model", "file:///x/y", "./seeds/tiny",
                    "../a/b", "~/m/x", "gpt2", None, 3):
        assert hub_id(not_hub) is None, not_hub
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_id(str(tmp_path / "owner" / "name")) is None
    assert public_location("s3://AKIA:secret@bucket/runs/ci?X-Amz-Signature=abc") == "s3://bucket/runs/ci"
    assert public_location("/abs/path") == "/abs/path"


def test_seed_lineage_takes_the_seeds_hub_id_else_its_cards(tmp_path):
    assert seed_lineage(None, "owner/seed") == {"base_model": "owner/seed", "seed": "owner/seed"}
    # A bare Hub name counts when the seed stage downloaded it from the Hub.
    assert seed_lineage(None, "gpt2", hub="gpt2")["base_model"] == "gpt2"
    (tmp_path / "README.md").write_text("---\nlicense: mit\nbase_model: [someone/parent, /local/x]\n---\n# s\n")
    local = seed_lineage(tmp_path, str(tmp_path))
    assert local == {"base_model": "someone/parent", "license": "mit", "seed": str(tmp_path)}
    assert "base_model" not in seed_lineage(None, "s3://u:p@bucket/seed")
    assert seed_lineage(None, "s3://u:p@bucket/seed")["seed"] == "s3://bucket/seed"


def test_mixed_models_card_without_a_hub_lineage_keeps_the_store_lineage_under_btx(tmp_path):
    experts = [Expert(n, tmp_path / n, f"s3://key:secret@bucket/run/experts/{n}/model") for n in DOMAINS]
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_experts_per_tok": 2,
              "router_aux_loss_coef": 0.02, "num_hidden_layers": 2}
    write_model_card(tmp_path, config=config, experts=experts, options=MixOptions(), routing={},
                     shared_weights=[0.5, 0.5], extra={"title": "t", "seed": "/abs/store/run/seed/model"})
    text = (tmp_path / "README.md").read_text()
    meta = hub_accepts(text)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["btx"]["lineage"] == {"seed": "/abs/store/run/seed/model",
                                      "experts": {n: f"s3://bucket/run/experts/{n}/model" for n in DOMAINS}}
    assert "secret" not in text and "key:" not in text
    write_model_card(tmp_path, config=config, experts=experts, options=MixOptions(), routing={},
                     shared_weights=[0.5, 0.5], extra={"seed": "owner/seed", "base_model": "owner/seed"})
    meta = hub_accepts((tmp_path / "README.md").read_text())
    assert (meta["base_model"], meta["base_model_relation"]) == ("owner/seed", "merge")


def test_finetuned_card_the_hub_accepts_with_recipe_merge_cost_and_evaluation(tmp_path):
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "btx_expert_names": DOMAINS}
    mix_card = {"base_model": "owner/seed", "base_model_relation": "merge", "license": "apache-2.0",
                "tags": ["btx", "moe"], "btx": {"experts": DOMAINS}}
    recipe = [{"stage": "seed (pretrained)", "data": "general", "steps": 20, "tokens": 5120, "lr": 3e-3},
              {"stage": "expert math", "data": "math", "steps": 12, "tokens": 3072, "lr": 1e-3}]
    write_finetune_card(tmp_path, config=config, source="/abs/store/ci/mix/model", source_card=mix_card,
                        stage="finetune", metrics={"steps": 6, "tokens": 1536, "heldout_loss": 2.5,
                                                   "mixture": {"math": 0.5, "code": 0.5}},
                        lineage={"seed": "/abs/store/ci/seed/model"}, recipe=recipe, lr=5e-4,
                        sections={"What the merge cost, before finetuning": "| domain | cost |\n|---|---|\n| math | 0.1 |"})
    text = (tmp_path / "README.md").read_text()
    meta = hub_accepts(text)
    # The mix card's Hub id carries over, with its relation; the store path stays under btx.
    assert (meta["base_model"], meta["base_model_relation"], meta["license"]) == ("owner/seed", "merge", "apache-2.0")
    assert meta["btx"]["lineage"] == {"source": "/abs/store/ci/mix/model", "seed": "/abs/store/ci/seed/model"}
    assert "| expert math | math | 12 | 3,072 | 0.001 |" in text
    assert "| finetune | math 50%, code 50% | 6 | 1,536 | 0.0005 |" in text
    assert "## What the merge cost, before finetuning" in text

    index = model_index("ci", results()["btx"], DOMAINS)
    evaluated = with_evaluation(text, index, evaluation_markdown(results(), DOMAINS, "btx"))
    meta = hub_accepts(evaluated)
    from huggingface_hub import ModelCard

    data = ModelCard(evaluated).data
    assert data.model_name == "ci" and len(data.eval_results) == 6  # 2 domains + mixed, loss and perplexity
    losses = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert losses[("math", "loss")] == 2.6 and losses[("mixed-domain", "loss")] == 2.8
    assert losses[("code", "perplexity")] == pytest.approx(14.880, abs=1e-3)
    assert "| held-out set | seed | own expert | btm-top1 | btx-mix | **btx** |" in evaluated
    assert "| math | 3.0000 | 2.5000 | 2.5500 | 2.9000 | 2.6000 |" in evaluated
    assert "| mixed | 3.3000 | - | 2.9500 | 3.0000 | 2.8000 |" in evaluated
    # Evaluated again: one table, the newest, and everything else as it was.
    again = with_evaluation(evaluated, model_index("ci", {**results()["btx"], "mixed": 2.7}, DOMAINS),
                            evaluation_markdown({**results(), "btx": {**results()["btx"], "mixed": 2.7}}, DOMAINS, "btx"))
    assert again.count("## Held-out evaluation") == 1 and "| mixed | 3.3000 | - | 2.9500 | 3.0000 | 2.7000 |" in again
    assert split_card(again)[1].startswith(split_card(evaluated)[1].split("## Held-out evaluation")[0])
    # One domain: no mixed-domain set to score.
    alone = {"single": {"math": 2.6}, "average": 2.6}
    assert [r["dataset"]["type"] for r in model_index("ci", alone, ["math"])[0]["results"]] == ["math"]
    assert "| mixed | - |" in evaluation_markdown({"btx": alone, "seed": {"single": {"math": 3.0}}}, ["math"], "btx")


def test_dense_finetune_from_a_local_seed_names_no_path_as_base_model(tmp_path):
    write_finetune_card(tmp_path, config={"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
                        source="/abs/store/ci/seed/model", source_card={"license": "mit"}, stage="finetune",
                        metrics={"steps": 3})
    meta = hub_accepts((tmp_path / "README.md").read_text())
    assert "base_model" not in meta and meta["btx"]["lineage"] == {"source": "/abs/store/ci/seed/model"}


def test_amend_replaces_one_file_and_the_manifest_only(tmp_path):
    from btx_core.store.core import Store

    store = Store(str(tmp_path / "store"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "README.md").write_text("---\nlicense: mit\n---\n# m\n")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    location = store.child("run", "model")
    before = store.write_dir(model, location, stage="finetune", config_hash="c", inputs={"model": "h"},
                             metrics={"steps": 6})
    card = b"---\nlicense: mit\n---\n# m, evaluated\n"
    after = store.amend(location, {"README.md": card})
    assert after.hash != before.hash and store.verify(location) == after
    assert (after.config_hash, after.inputs, after.metrics) == ("c", {"model": "h"}, {"steps": 6})
    assert after.files["model.safetensors"] == before.files["model.safetensors"]
    assert store.exists_with(location, "c", {"model": "h"}) is not None  # its stage still skips
    assert json.loads(Path(store._path(location), "_manifest.json").read_text())["files"]["README.md"]["size"] == len(card)
    assert yaml.safe_load(store.read_file(location, "README.md", after).decode().split("---")[1]) == {"license": "mit"}

