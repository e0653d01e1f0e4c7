"""MoE-finetuning (and its baselines) with each routing and load-balancing option, Branch-Train-Merge,
evaluation and `btx compare`, on the CI pico model (the loss itself: tests/unit/test_load_balancing.py)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from btx_core.errors import BTXError, CheckpointMismatchError
from btx_core.stages.common import open_store
from btx_core.stages.compare import compare
from btx_core.stages.evaluate import evaluate_location, evaluate_run
from btx_core.stages.expert import train_expert
from btx_core.stages.finetune import finetune
from btx_core.stages.mix import mix_stage
from btx_core.stages.seed import build_seed
from btx_core.store import layout
from btx_core.store.core import checkpoint_location
from btx_core.training.state import MODEL_FILE
from tests.integration.test_cli_e2e import btx
from tests.integration.test_mix_stage import ci_config
from tests.unit.test_model_card import hub_accepts

# --- finetuning on a real (pico) run -------------------------------------------------------------

def finetune_config(work: Path, **finetune_options):
    config = ci_config(str(work / "store"), work / "cache", domains=2)
    training = config.finetune.training.model_copy(update={"steps": 6, "checkpoint_every": 2})
    return config.model_copy(update={"finetune": config.finetune.model_copy(
        update={"training": training, **finetune_options})})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A local store with the CI seed, two experts, their MiX and the upcycled seed."""
    work = tmp_path_factory.mktemp("ftrun")
    config = finetune_config(work)
    with pytest.raises(BTXError, match="btx mix CONFIG"):
        finetune(config)
    build_seed(config)
    for d in config.domains:
        train_expert(config, d.name)
    mix_stage(config)
    mix_stage(config, upcycle=True)
    return work, config


def _tensors(location: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(location).glob("*.safetensors")):
        with safe_open(str(f), "pt") as reader:
            out |= {k: reader.get_tensor(k) for k in reader.keys()}
    return out


def test_finetune_trains_the_mixed_model_on_the_mixture(mixed):
    work, config = mixed
    out = finetune(config)
    m = out.metrics
    assert out.location == layout.trained_model(config.run_root, "btx") and m["steps"] == 6
    assert set(m["mixture"]) == {"math", "code", "general"}
    assert m["routing"] == {"strategy": "top_k", "top_k": 2, "load_balancing": True, "alpha": 0.01,
                            "loss": "paper", "temperature": None}
    assert m["heldout_loss"] < m["start_heldout_loss"]
    # The paper's loss, per layer: alpha at perfect balance, at most alpha x N at total collapse. It
    # can fall a little below alpha when a layer's slot shares and mean probabilities disagree, as
    # the centroid routers (the default) make them do: about alpha x layers here.
    layers = 2
    assert 0.01 * layers * 0.8 <= m["final_load_balancing_loss"] <= 0.01 * layers * 3
    saved = json.loads((Path(out.location) / "config.json").read_text())
    assert saved["architectures"] == ["MixtralForCausalLM"] and saved["output_router_logits"] is False
    assert saved["num_hidden_layers"] == layers
    assert saved["router_aux_loss_coef"] == pytest.approx(0.01 * layers)  # stock; unused by the paper's loss
    text = (Path(out.location) / "README.md").read_text()
    card = hub_accepts(text)
    # A seed made by the run has no Hub id: no base_model, the store lineage under btx.
    assert "base_model" not in card and card["btx"]["lineage"]["source"] == layout.mix_model(config.run_root)
    assert card["pipeline_tag"] == "text-generation" and "btx" in card["tags"]
    assert "## Recipe" in text and "| finetune | math " in text and "| expert code | code |" in text
    assert "## What the merge cost, before finetuning" in text
    assert (Path(out.location) / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out.location)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    assert finetune(config).skipped  # idempotent


def test_frozen_experts_stay_bit_identical(mixed):
    work, config = mixed
    frozen = config.model_copy(update={"finetune": config.finetune.model_copy(update={"freeze_experts": True})})
    out = finetune(frozen, name="frozen")
    before, after = _tensors(layout.mix_model(config.run_root)), _tensors(out.location)
    experts = [k for k in before if ".experts." in k]
    assert experts and all(torch.equal(before[k], after[k]) for k in experts)
    changed = [k for k in before if k not in experts and not torch.equal(before[k], after[k])]
    assert any(".gate." in k for k in changed) and any("self_attn" in k for k in changed)
    assert out.metrics["frozen_parameters"] > 0


def test_interrupted_finetune_resumes_to_the_same_weights(mixed):
    work, config = mixed
    with pytest.raises(BTXError, match="stopped at step 3"):
        finetune(config, name="resumed", stop_after=3)
    resumed = finetune(config, name="resumed")
    assert resumed.metrics["resumed_from_step"] == 2  # the newest checkpoint (every 2 steps)
    straight = finetune(config, name="straight")
    a, b = _tensors(resumed.location), _tensors(straight.location)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_config_change_restarts_a_finished_finetune_but_not_an_interrupted_one(mixed):
    """The checkpoints of a finished finetune are leftovers once the config changes: a rerun starts
    over (no manual delete). Those of an interrupted one are refused: restoring the config resumes."""
    work, config = mixed

    def with_lr(lr: float):
        ft = config.finetune
        return config.model_copy(update={"finetune": ft.model_copy(update={"training": ft.training.model_copy(
            update={"lr": lr})})})

    first = finetune(config, name="changed")
    second = finetune(with_lr(2e-4), name="changed")
    assert second.manifest.hash != first.manifest.hash and second.metrics["resumed_from_step"] == 0
    with pytest.raises(BTXError, match="stopped at step 3"):
        finetune(with_lr(3e-4), name="changed", stop_after=3)  # its step-2 checkpoint is newest now
    with pytest.raises(CheckpointMismatchError, match="made with a different config"):
        finetune(with_lr(4e-4), name="changed")
    assert finetune(with_lr(3e-4), name="changed").metrics["resumed_from_step"] == 2


def test_router_warmup_resumes_exactly_across_its_end(mixed):
    """Routers alone for 3 steps, then everything: a run stopped at step 3 resumes from its step-2
    checkpoint (inside the warm-up) and ends with the weights of an uninterrupted run."""
    work, config = mixed
    warm = config.model_copy(update={"finetune": config.finetune.model_copy(update={"router_warmup_steps": 3})})
    with pytest.raises(BTXError, match="stopped at step 3"):
        finetune(warm, name="w-resumed", stop_after=3)
    step2 = load_file(str(Path(checkpoint_location(layout.trained_checkpoints(config.run_root, "w-resumed"), 2)) / MODEL_FILE))
    start = AutoModelForCausalLM.from_pretrained(layout.mix_model(config.run_root)).state_dict()  # in-memory names
    moved = {k for k in step2 if not torch.equal(start[k], step2[k])}
    assert moved == {k for k in start if k.endswith("mlp.gate.weight")}  # every router, nothing else so far
    resumed = finetune(warm, name="w-resumed")
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["router_warmup_steps"] == 3
    straight = finetune(warm, name="w-straight")
    a, b = _tensors(resumed.location), _tensors(straight.location)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = _tensors(finetune(config).location)  # the warm-up changes what is trained
    assert any(not torch.equal(a[k], plain[k]) for k in a if "self_attn" in k)


def test_mix_reports_what_averaging_the_experts_cost(mixed):
    work, config = mixed
    cost = open_store(config).read_manifest(layout.mix_model(config.run_root)).metrics["merge_cost"]
    for domain, losses in cost["losses"].items():  # experts trained everything: the merge costs them
        assert losses["oracle"] > losses["expert"], (domain, losses)
    attention = cost["distances"]["kinds"]["attention"]
    assert min(attention["distance"][d] for d in ("math", "code")) > 0 and attention["distance"]["seed"] == 0
    assert cost["tokens_per_domain"] == {"math": 512, "code": 512}  # 8 blocks of 64: mix.merge_cost_tokens
    assert cost["merge_weights"] == {"math": 0.5, "code": 0.5, "seed": 0.0}


def test_experts_with_frozen_shared_weights_mix_without_loss(mixed):
    """`branch.train: ffn`: each expert's saved shared tensors are the seed's bit for bit, so MiX's
    mean of them is the seed's and the MoE routed to an expert alone is that expert."""
    from btx_core.config.method import BranchSettings
    from btx_core.config.schema import SeedSpec
    from btx_core.stages.expert import expert_config_hash

    work, config = mixed
    frozen = config.model_copy(update={
        "run_name": "frozen", "branch": BranchSettings(train="ffn"),
        "mix": config.mix.model_copy(update={"router_init": "normal"}),  # routers that know nothing yet
        "seed": SeedSpec(model=layout.seed_model(config.run_root), pretrain_data=config.seed.pretrain_data)})
    assert expert_config_hash(frozen, "math") != expert_config_hash(config, "math")
    build_seed(frozen)
    seed = _tensors(layout.seed_model(frozen.run_root))
    for d in frozen.domains:
        out = train_expert(frozen, d.name)
        expert = _tensors(out.location)
        assert expert.keys() == seed.keys()
        moved = {k for k in seed if not torch.equal(seed[k], expert[k])}
        assert moved == {k for k in seed if ".mlp." in k}, d.name  # every FFN tensor, nothing else
        assert out.metrics["frozen_parameters"]["attention"] > 0 and out.metrics["branch_train"] == "ffn"
    cost = mix_stage(frozen).manifest.metrics["merge_cost"]
    for domain, losses in cost["losses"].items():
        assert losses["oracle"] == pytest.approx(losses["expert"], abs=1e-5), domain
        assert losses["mix"] > losses["oracle"]  # what is left: the untrained routers
    for kind in ("embeddings", "attention", "norms"):
        assert max(cost["distances"]["kinds"][kind]["merged_distance"].values()) == 0.0
    assert cost["settings"]["branch.train"] == "ffn"


def test_interrupted_sample_top1_finetune_resumes_to_the_same_weights(mixed):
    # The Gumbel noise comes from torch's RNG and the temperature from the step: both are restored.
    work, config = mixed
    sampled = config.model_copy(update={"finetune": config.finetune.model_copy(update={"routing": "sample_top1"})})
    with pytest.raises(BTXError, match="stopped at step 3"):
        finetune(sampled, name="s-resumed", stop_after=3)
    resumed = finetune(sampled, name="s-resumed")
    assert resumed.metrics["resumed_from_step"] == 2
    straight = finetune(sampled, name="s-straight")
    a, b = _tensors(resumed.location), _tensors(straight.location)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_routing_and_load_balancing_ablations_are_config_lines(mixed):
    """Load balancing off, transformers' loss, sample top-1: each one line of `finetune`, each
    saved as a stock MoE that AutoModelForCausalLM loads."""
    work, config = mixed

    def run(name, **options):
        ablation = config.model_copy(update={"finetune": config.finetune.model_copy(update=options)})
        out = finetune(ablation, name=name)
        saved = json.loads((Path(out.location) / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(out.location)
        assert type(model).__name__ == "MixtralForCausalLM" and saved["output_router_logits"] is False
        assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
        return out.metrics, saved

    off, _ = run("no-lb", load_balancing=False)
    assert off["routing"]["load_balancing"] is False and "final_load_balancing_loss" not in off
    stock, saved = run("stock-lb", load_balancing_loss="transformers")
    assert stock["routing"]["loss"] == "transformers" and "final_load_balancing_loss" not in stock
    assert saved["router_aux_loss_coef"] == pytest.approx(0.01 * 2)
    # The same data and init: only the loss term differs, so the trained weights differ.
    assert off["final_train_loss"] != stock["final_train_loss"]
    sampled, saved = run("sample-top1", routing="sample_top1", gumbel_temperature=(2.0, 0.5))
    assert sampled["routing"] == {"strategy": "sample_top1", "top_k": 1, "load_balancing": True,
                                  "alpha": 0.01, "loss": "paper", "temperature": [2.0, 0.5]}
    assert saved["num_experts_per_tok"] == 1  # top-1 at inference
    assert 0.01 * 2 <= sampled["final_load_balancing_loss"] <= 0.01 * 2 * 3


def test_soft_routing_and_the_baselines(mixed):
    work, config = mixed
    soft = config.model_copy(update={"finetune": config.finetune.model_copy(update={"routing": "soft"})})
    out = finetune(soft, name="soft")
    saved = json.loads((Path(out.location) / "config.json").read_text())
    assert saved["num_experts_per_tok"] == saved["num_local_experts"] == 3
    up = finetune(config, "upcycle", steps=3, name="upcycle-x")
    dense = finetune(config, "dense", steps=3, name="dense-x")
    assert up.metrics["steps"] == dense.metrics["steps"] == 3
    assert up.metrics["flops_per_token"] > dense.metrics["flops_per_token"]
    assert json.loads((Path(dense.location) / "config.json").read_text())["model_type"] == "llama"
    result = evaluate_location(config, out.location)
    routing = result["routing"]["single"]
    assert set(result["single"]) == {"math", "code"} and math.isfinite(result["mixed"])
    assert set(result["mixed_by_domain"]) == {"math", "code"}  # each domain's segments
    for shares in routing["by_domain_topk"]["math"]:
        assert sum(shares) == pytest.approx(1.0) and min(shares) > 0  # soft: every expert used


def test_finetune_and_eval_commands(mixed):
    work, config = mixed
    path = work / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    out = btx("finetune", str(path), cwd=work)
    assert "held-out loss (mixture)" in out.stdout
    assert "Loading weights" not in out.stderr  # transformers' per-load bars stay off a btx console
    out = btx("eval", str(path), "--model", layout.trained_model(config.run_root, "btx"), "--out", str(work / "e.json"),
              cwd=work)
    assert "mixed-domain" in out.stdout and json.loads((work / "e.json").read_text())["routing"]
    assert "Loading weights" not in out.stderr
    evaluated = evaluate_run(config)
    losses = evaluated.metrics["losses"]
    assert {"seed", "expert:math", "expert:code", "btx-mix", "btx", "btm-top1", "btm-top2"} <= set(losses)
    assert set(evaluated.metrics["merge_cost"]["losses"]) == {"math", "code"}  # MiX's, beside the losses
    # BTX's card gained the table and a model-index the Hub parses; the evaluation records the
    # amended model, so nothing reruns and the model still verifies.
    store, trained = open_store(config), layout.trained_model(config.run_root, "btx")
    card = (Path(trained) / "README.md").read_text()
    meta = hub_accepts(card)
    assert meta["model-index"][0]["name"] == config.run_name and "## Held-out evaluation" in card
    assert evaluated.manifest.inputs["btx"] == store.verify(trained).hash
    assert evaluate_run(config).skipped and finetune(config).skipped


def test_compare_writes_the_table_claims_and_heatmaps(mixed, tmp_path):
    work, config = mixed
    config = config.model_copy(update={"compare": config.compare.model_copy(update={"seeds": [0, 1]})})
    report = compare(config, out_dir=tmp_path)
    rows = {"seed", "expert:math", "expert:code", "btm-top1", "btm-top2", "btx-mix", "btx",
            "upcycle-tokens", "upcycle-flops", "upcycle-time", "dense-tokens", "dense-flops", "dense-time"}
    assert set(report["summary"]) == rows and report["seeds"] == [0, 1]
    for seed, result in report["per_seed"].items():
        assert set(result["rows"]) == rows
        budgets = result["budgets"]
        assert budgets["upcycle_tokens"] > budgets["upcycle_flops"]  # an MoE token costs more
        assert budgets["dense_flops"] > budgets["dense_tokens"]
        r = result["rows"]
        assert r["upcycle-tokens"]["tokens"] == pytest.approx(r["btx"]["tokens"], rel=0.02)
        assert r["dense-flops"]["flops"] == pytest.approx(r["btx"]["flops"], rel=0.02)
        # Device time: BTX's is its experts' plus its finetuning's, measured in this run; each
        # time-matched baseline trains that many seconds over its own measured seconds per step.
        assert budgets["btx_device_s"] == pytest.approx(r["btx"]["device_s"]) and r["btx"]["device_s"] > 0
        assert r["btx"]["device_s"] > sum(r[f"expert:{d}"]["device_s"] for d in ("math", "code"))
        for kind in ("upcycle", "dense"):
            per_step = budgets[f"{kind}_step_s"]
            assert budgets[f"{kind}_time"] == max(1, round(budgets["btx_device_s"] / per_step))
            assert r[f"{kind}-time"]["tokens"] == budgets[f"{kind}_time"] * r[f"{kind}-tokens"]["tokens"] // \
                budgets[f"{kind}_tokens"]
    assert report["per_seed"][1]["run_name"] == f"{config.run_name}-seed1"
    # Which held-out blocks every model was scored on, and the planned split of BTX's FLOPs.
    sets = json.loads((tmp_path / "results.json").read_text())["eval_sets"]
    assert sets["seed"] == config.compare.eval_seed and set(sets["single_block_indices"]) == {"math", "code"}
    assert all(len(ix) == min(config.compare.eval_blocks, sets["heldout_blocks"][d])
               for d, ix in sets["single_block_indices"].items())
    assert len(sets["mixed_sources"]) == config.compare.mixed_blocks
    assert 0 < report["planned_compute"]["expert_flop_share"] < 1
    assert report["summary"]["btx"]["average"]["n"] == 2
    claims = {c["claim"] for c in report["claims"]}
    assert "expert math beats the seed on math" in claims
    files = {p.name for p in tmp_path.iterdir()}
    assert {"results.json", "results.md", "routing-btx-seed1-single-top1.png", "routing-btx-mix-seed0-mixed-top1.png",
            "routing-upcycle-flops-seed1-mixed-topk.csv"} <= files
    md = (tmp_path / "results.md").read_text()
    assert "| Model | math | code | Average | Mixed-domain |" in md and "| math segments | code segments |" in md
    assert "## What the merge cost, before finetuning" in md and "### Seed 1: what the merge cost" in md
    assert set(report["per_seed"][1]["merge_cost"]["losses"]) == {"math", "code"}
    assert "BTX beats the seed on code segments (mixed set)" in claims
    assert open_store(config).is_complete(layout.compare_results(config.run_root))


def test_compare_reuses_a_seeds_recorded_scores_until_a_scoring_setting_changes(mixed, tmp_path, monkeypatch):
    """One `btx compare --seeds r` per seed, then one over all of them: the last scores no model
    again (each seed's scores are a store output keyed on its models' manifests and the sets)."""
    import btx_core.stages.compare as compare_module

    work, config = mixed
    config = config.model_copy(update={"compare": config.compare.model_copy(update={"seeds": [0]})})
    first = compare(config)["per_seed"][0]
    scored = []

    def counting(cfg, location, sets, real=compare_module.score_location):
        scored.append(location)
        return real(cfg, location, sets)
    monkeypatch.setattr(compare_module, "score_location", counting)
    again = compare(config)
    assert scored == [] and again["per_seed"][0] == first
    assert open_store(config).is_complete(layout.compare_scores(config.run_root))
    # Another batch size may round differently: every model is scored again, and recorded anew.
    rebatched = config.model_copy(update={"compare": config.compare.model_copy(update={"batch_size": 3})})
    redone = compare(rebatched)["per_seed"][0]
    assert len(scored) == len(first["rows"]) - len(config.compare.btm_top_k)  # BTM ensembles are not models
    assert set(redone["rows"]) == set(first["rows"])
    assert redone["rows"]["btx"]["average"] == pytest.approx(first["rows"]["btx"]["average"], abs=1e-4)
    scored.clear()
    compare(rebatched)
    assert scored == []


def test_compare_trains_and_reports_only_the_matchings_asked_for(mixed, monkeypatch):
    """`compare.matchings: [flops]`: no token- or time-matched baseline is trained or reported."""
    import btx_core.stages.compare as compare_module

    work, config = mixed
    config = config.model_copy(update={"compare": config.compare.model_copy(update={"seeds": [0],
                                                                                    "matchings": ["flops"]})})
    finetuned = []

    def counting(cfg, kind="btx", *, steps=None, name=None, real=compare_module.finetune):
        finetuned.append(name or kind)
        return real(cfg, kind, steps=steps, name=name)
    monkeypatch.setattr(compare_module, "finetune", counting)
    report = compare(config)
    assert finetuned == ["btx", "upcycle-flops", "dense-flops"]
    rows = report["per_seed"][0]["rows"]
    assert {"upcycle-flops", "dense-flops", "btx", "btm-top2"} <= set(rows)
    assert not {n for n in rows if n.endswith(("-tokens", "-time"))}
    assert report["per_seed"][0]["budgets"]["upcycle_time"] == 0
    claims = [c["claim"] for c in report["claims"]]
    assert any("FLOP-matched" in c for c in claims) and not any("token-matched" in c or "time-matched" in c
                                                                  for c in claims)


def test_ablate_redoes_only_what_each_line_changes_and_keeps_the_reference(mixed, tmp_path):
    from btx_core.stages.ablate import ablate

    work, config = mixed
    store = open_store(config)
    reference_btx = finetune(config).manifest.hash
    reference_mix = store.read_manifest(layout.mix_model(config.run_root)).hash
    report = ablate(config, only=["seed-in-shared-mean", "router-centroid", "no-load-balancing"], out_dir=tmp_path)
    rows = report["rows"]
    assert list(rows) == ["reference", "seed-in-shared-mean", "no-load-balancing"]
    assert report["skipped"] == {"router-centroid": 'mix.router_init: "centroid"'}  # the config's own line
    # The MiX line mixed anew elsewhere; the finetune line started from the reference MiX.
    new_mix = store.read_manifest(layout.ablation_mix(config.run_root, "seed-in-shared-mean"))
    assert new_mix.hash != reference_mix and "mix_only" in rows["seed-in-shared-mean"]
    assert rows["seed-in-shared-mean"]["mix_only"]["average"] != rows["reference"]["mix_only"]["average"]
    no_lb = store.read_manifest(layout.trained_model(config.run_root, "ablation-no-load-balancing"))
    assert no_lb.inputs["model"] == reference_mix and "mix_only" not in rows["no-load-balancing"]
    assert no_lb.metrics.get("final_load_balancing_loss") is None
    assert rows["reference"]["final_load_balancing_loss"] > 0
    # Nothing of the reference run was rewritten.
    assert store.read_manifest(layout.mix_model(config.run_root)).hash == reference_mix
    assert store.read_manifest(layout.trained_model(config.run_root, "btx")).hash == reference_btx
    md = (tmp_path / "ablations.md").read_text()
    assert "| no-load-balancing: `finetune.load_balancing: false` |" in md
    assert 'Not run, the config already has the line: router-centroid (`mix.router_init: "centroid"`)' in md
    assert "## no-load-balancing: routing per layer" in md and "math tokens -> expert math" in md
    assert json.loads((tmp_path / "ablations.json").read_text())["rows"]["reference"]["routing"]
    assert store.is_complete(layout.ablation_results(config.run_root))
    with pytest.raises(BTXError, match="unknown ablation.*known: router-centroid"):
        ablate(config, only=["switch"])
    with pytest.raises(BTXError, match="nothing to ablate: the config already has mix.router_init"):
        ablate(config, only=["router-centroid"])

