"""Every dense family mixes into its MoE exactly: for each family x config.json format (as transformers
4 wrote it, by hand; as transformers 5 writes it) x tied/untied embeddings x RoPE type, the MoE of
copies of the seed reproduces the dense logits on 300 tokens; BTX experts are copied bit for bit and
shared tensors are the mean; the output is what HF users load, route, finetune and edit."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from btx_core.model.families import DENSE_FAMILIES
from btx_core.model.tensor_io import CheckpointReader
from btx_core.moe.edit import drop_expert
from btx_core.moe.mix import Expert, MixOptions, mix
from btx_core.moe.routing import RoutingPlan, configure, freeze_experts, moe_blocks
from tests.pico import ROPE, branch, dense, save
from tests.support.equivalence import load_float64, logit_gap

FAMILIES = sorted(DENSE_FAMILIES)
LENGTH = 300  # > max_position_embeddings (128): dynamic and longrope RoPE change regime inside it
# Weights 10x transformers' default init: attention sharp enough that positions matter (logits ~5,
# as a trained model's), so a RoPE fault moves the logits by ~0.2-2 instead of ~1e-5.
SHARP = {"initializer_range": 0.2}


def ids(length=LENGTH, seed=0):
    return torch.randint(0, 101, (1, length), generator=torch.Generator().manual_seed(seed))


def mixed(experts, out, **options):
    """The MoE that `mix` writes, loaded in float64 (tests/support/equivalence.py says why)."""
    out.mkdir()
    mix(experts, MixOptions(**options), out)
    return load_float64(out)


@pytest.mark.parametrize("rope", list(ROPE))
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("fmt", ["t4", "t5"])
@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_seed_reproduces_the_dense_logits(tmp_path, family, fmt, tie, rope):
    model = dense(family, tie=tie, rope=rope, **SHARP)
    source = save(model, tmp_path / "dense", fmt=fmt)
    moe = mixed([Expert(f"c{i}", source) for i in range(3)], tmp_path / "moe")
    assert type(moe).__name__ == DENSE_FAMILIES[family].moe.architecture
    assert moe.config.rope_parameters == {k: v for k, v in model.config.rope_parameters.items() if k != "type"}
    gap = logit_gap(moe, model, ids())
    print(f"\nLOGIT-DIFF {family} {fmt} {'tied' if tie else 'untied'} {rope} {gap.diff:.2e} (bound {gap.bound:.1e})")
    assert gap.same, gap


def test_transformers4_config_keeps_the_seeds_rope_theta(tmp_path):
    """The original bug: a config.json written by transformers 4 (rope_theta 100000 at the top level)
    copied as a raw dict gave Mixtral its default theta 1e6 and logits off by whole units."""
    model = dense("llama", theta=100_000.0, tie=True, **SHARP)
    source = save(model, tmp_path / "dense", fmt="t4")
    assert "rope_parameters" not in json.loads((source / "config.json").read_text())
    moe = mixed([Expert(f"c{i}", source) for i in range(2)], tmp_path / "moe")
    assert moe.config.rope_parameters["rope_theta"] == 100_000.0
    ours = logit_gap(moe, model, ids())
    assert ours.same, ours
    wrong = load_float64(tmp_path / "moe", rope_parameters={
        "rope_type": "default", "rope_theta": 1e6})  # what the raw-dict config produced
    assert type(wrong) is MixtralForCausalLM
    # theta 1e6 for 1e5: a 135M Llama's logits differed by up to 17.
    assert logit_gap(wrong, model, ids()).diff > 100 * ours.bound


@pytest.mark.parametrize("fault", ["theta+10%", "rope_scaling dropped", "tensor missing"])
def test_the_float64_bound_catches_what_the_equivalence_tests_exist_for(tmp_path, fault):
    """Each fault a mix could commit, on the sharp pico model (logits ~5): the bound (~4e-5 here)
    must flag it by orders of magnitude, or the equivalence tests above prove nothing. (The real
    seed's theta + 10 % is checked in tests/integration/test_real_seed.py.)"""
    model = dense("llama", rope="llama3", theta=100_000.0, **SHARP)
    source = save(model, tmp_path / "dense", fmt="t4")
    moe_dir = tmp_path / "moe"
    assert logit_gap(mixed([Expert(f"c{i}", source) for i in range(3)], moe_dir), model, ids()).same
    config = json.loads((moe_dir / "config.json").read_text())
    if fault == "theta+10%":
        config["rope_parameters"]["rope_theta"] *= 1.1
    elif fault == "rope_scaling dropped":  # llama3 scaling lost, theta kept
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    else:  # a norm never written: transformers loads anyway, with ones (a missing expert tensor it refuses)
        from safetensors.torch import load_file, save_file

        shard = moe_dir / "model.safetensors"
        tensors = load_file(shard)
        del tensors["model.layers.1.post_attention_layernorm.weight"]
        save_file(tensors, shard, metadata={"format": "pt"})
    (moe_dir / "config.json").write_text(json.dumps(config))
    gap = logit_gap(load_float64(moe_dir), model, ids())
    print(f"\n{fault}: {gap}")
    assert gap.diff > 1000 * gap.bound, gap


@pytest.mark.parametrize("family", FAMILIES)
def test_btx_experts_are_exact_and_shared_tensors_the_mean(tmp_path, family):
    seed = dense(family)
    paths = [branch(seed, tmp_path / f"e{i}", seed=i + 1) for i in range(3)]
    out = tmp_path / "moe"
    out.mkdir()
    mix([Expert(f"e{i}", p) for i, p in enumerate(paths)], MixOptions(), out)
    fam, readers, moe = DENSE_FAMILIES[family], [CheckpointReader(p) for p in paths], CheckpointReader(out)
    for layer in range(2):
        for i, r in enumerate(readers):
            for role in fam.ffn:
                assert torch.equal(moe.get(fam.moe.expert_name(role, layer, i)), r.get(fam.ffn_name(role, layer)))
    shared = fam.shared_names(2, False, readers[0].meta and json.loads((paths[0] / "config.json").read_text()))
    assert len(shared) >= 12
    for name in shared:  # the exact mean, rounded once (MiX accumulates in fp64)
        exact = torch.stack([r.get(name).double() for r in readers]).mean(0)
        assert torch.equal(moe.get(name), exact.to(moe.get(name).dtype)), name
    model = AutoModelForCausalLM.from_pretrained(out)  # every tensor placed: nothing newly initialised
    loaded = model.state_dict()
    assert all(torch.isfinite(t).all() for t in loaded.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_output_is_what_hf_users_expect_and_routes_finetunes_and_edits(tmp_path, family):
    seed = dense(family)
    paths = [branch(seed, tmp_path / f"e{i}", seed=i + 1) for i in range(3)]
    (paths[0] / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/pico\n---\n# pico\n")
    out = tmp_path / "moe"
    out.mkdir()
    mix([Expert(n, p) for n, p in zip(("math", "code", "wiki"), paths)], MixOptions(), out)
    config = json.loads((out / "config.json").read_text())
    assert config["transformers_version"] and config["output_router_logits"] is False
    assert config["btx_expert_names"] == ["math", "code", "wiki"]
    assert {"generation_config.json", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "someone/pico" and meta["base_model_relation"] == "merge"
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert {"btx", "moe", config["model_type"]} <= set(meta["tags"])
    assert meta["btx"]["experts"] == ["math", "code", "wiki"]

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(ids(4), max_new_tokens=5, do_sample=False).shape == (1, 9)
    # routing strategies, the load-balancing loss and freezing work on every target
    configure(model, RoutingPlan("soft", top_k=2, load_balancing=True, alpha=0.01))
    assert all(block.gate.top_k == 3 for block in moe_blocks(model))
    configure(model, RoutingPlan("top_k", top_k=1, load_balancing=True, alpha=0.01))
    assert all(block.gate.top_k == 1 for block in moe_blocks(model))
    tokens = ids(16)
    with_aux = model(tokens, labels=tokens)
    assert with_aux.aux_loss is not None and torch.isfinite(with_aux.loss)
    frozen = freeze_experts(model)
    assert frozen == 2 * 3 * 3 * 32 * 64
    # drop-expert on every target
    small = tmp_path / "small"
    small.mkdir()
    edited, _ = drop_expert(out, "code", small)
    assert edited["btx_expert_names"] == ["math", "wiki"]
    reloaded = AutoModelForCausalLM.from_pretrained(small)
    assert reloaded.config.num_experts == 2
    fam = DENSE_FAMILIES[family]
    assert torch.equal(CheckpointReader(small).get(fam.moe.expert_name("down_proj", 1, 1)),
                       CheckpointReader(out).get(fam.moe.expert_name("down_proj", 1, 2)))
    assert torch.isfinite(reloaded(tokens).logits).all()

