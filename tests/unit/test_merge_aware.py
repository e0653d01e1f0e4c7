"""What the merge costs, and the levers that make it cost less, on pico models: weight distances on
a constructed update, the oracle-routed MoE (each domain routed to its own expert alone), expert
training with the shared weights frozen (`branch.train`), the router warm-up of the finetune, and
the rule of the shared merge (`mix.shared_policy` with the seed kept out of the mean)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from btx_core.config.load import parse_config
from btx_core.config.schema import TrainSettings
from btx_core.errors import ConfigError
from btx_core.evaluation import merge_cost
from btx_core.evaluation.scores import token_logprobs
from btx_core.model.dense import load_causal_lm
from btx_core.model.families import DENSE_FAMILIES, tensor_kinds
from btx_core.model.tensor_io import CheckpointReader
from btx_core.moe.mix import Expert, MixInputError, MixOptions, mix
from btx_core.moe.routing import RouterObjective, RoutingPlan, configure, forced_expert, moe_blocks
from btx_core.stages.expert import freeze_shared
from btx_core.stages.mix import GENERALIST, options_from_config
from btx_core.training.loop import train
from tests.pico import dense, save

CI = Path(__file__).parents[2] / "configs" / "ci.yaml"
SEQ = 16


def kinds_of(model) -> dict[str, str]:
    return tensor_kinds(model.config.to_dict())


def mixed(tmp_path: Path, experts: dict[str, Path], tag: str = "moe", **options) -> Path:
    out = tmp_path / tag
    out.mkdir()
    mix([Expert(n, p) for n, p in experts.items()], MixOptions(**options), out)
    return out


# --- the oracle: routed to one expert alone, the MoE of FFN-only experts is that expert -----------

def ffn_branch(seed_model, seed: int):
    """A copy of `seed_model` with only its FFNs changed: an expert trained with branch.train: ffn."""
    copy = type(seed_model)(seed_model.config).eval()
    copy.load_state_dict(seed_model.state_dict())
    kinds = kinds_of(copy)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if kinds[name] == "ffn":
                p.add_(torch.randn_like(p) * 0.05)
    return copy


@pytest.mark.parametrize("family", sorted(DENSE_FAMILIES))
def test_oracle_routed_moe_reproduces_each_ffn_only_expert_in_fp32(tmp_path, family):
    seed = dense(family)
    experts = {f"e{i}": ffn_branch(seed, i + 1) for i in range(3)}
    moe = AutoModelForCausalLM.from_pretrained(
        mixed(tmp_path, {n: save(m, tmp_path / n) for n, m in experts.items()})).eval()
    ids = torch.randint(0, 101, (2, SEQ), generator=torch.Generator().manual_seed(0))
    routed_gap = 0.0
    with torch.no_grad():
        for i, expert in enumerate(experts.values()):
            reference = expert(ids).logits
            with forced_expert(moe, i):
                oracle = moe(ids).logits
            assert oracle.dtype == torch.float32 and (oracle - reference).abs().max() <= 1e-5
            routed_gap = max(routed_gap, float((moe(ids).logits - reference).abs().max()))
    assert routed_gap > 1e-2  # as its routers route, the MoE is no single expert: the forcing is what matched
    assert all(type(b.gate).__name__.endswith("TopKRouter") for b in moe_blocks(moe))  # restored after


# --- weight distances ------------------------------------------------------------------------------

def test_weight_distances_of_a_known_update(tmp_path):
    seed = dense("llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.manual_seed(7)
    delta = torch.randn_like(seed.get_parameter(name)) * 0.01
    paths = {"seed": save(seed, tmp_path / "seed")}
    for tag, sign in (("up", 1.0), ("down", -1.0)):
        copy = type(seed)(seed.config)
        copy.load_state_dict(seed.state_dict())
        with torch.no_grad():
            copy.get_parameter(name).add_(sign * delta)
        paths[tag] = save(copy, tmp_path / tag)
    reader = CheckpointReader(paths["seed"])
    attention = [n for n, k in kinds_of(seed).items() if k == "attention"]
    scale = math.sqrt(sum(float(reader.get(n).double().square().sum()) for n in attention))
    moved = float(delta.double().norm()) / scale
    report = merge_cost.weight_distances(paths["seed"], {"up": paths["up"], "down": paths["down"]},
                                         {"up": 0.5, "down": 0.5})
    att = report["kinds"]["attention"]
    assert att["distance"] == pytest.approx({"up": moved, "down": moved}, rel=1e-6)
    assert att["cosine"]["up|down"] == pytest.approx(-1.0, abs=1e-9)
    assert att["merged_distance"] == pytest.approx({"up": moved, "down": moved}, rel=1e-6)  # mean = seed
    assert att["params"] == sum(reader.meta[n].shape[0] * reader.meta[n].shape[1] for n in attention)
    for kind in ("embeddings", "norms", "ffn"):
        assert set(report["kinds"][kind]["distance"].values()) == {0.0}
        assert report["kinds"][kind]["cosine"]["up|down"] is None  # no update, no direction
    assert "merged_distance" not in report["kinds"]["ffn"]  # kept per expert, never merged
    one_sided = merge_cost.weight_distances(paths["seed"], {"up": paths["up"], "down": paths["down"]},
                                            {"up": 1.0, "down": 0.0})["kinds"]["attention"]["merged_distance"]
    assert one_sided["up"] == pytest.approx(0.0, abs=1e-9) and one_sided["down"] == pytest.approx(2 * moved, rel=1e-6)


# --- experts trained with the shared weights frozen, or not ----------------------------------------

def pattern_blocks(first: int, step: int, n: int = 48) -> np.ndarray:
    """A domain the pico model learns in a few steps: runs of first, first+step, ... (mod a range)."""
    starts = np.random.default_rng(first).integers(0, 30, size=n)
    return np.stack([first + ((s + np.arange(SEQ)) * step) % 30 for s in starts]).astype(np.int64)


DOMAINS = {"up": pattern_blocks(10, 1), "skip": pattern_blocks(50, 7)}


def trained_experts(tmp_path: Path, train_what: str) -> tuple[Path, dict[str, Path]]:
    seed = dense("llama")
    seed_dir = save(seed, tmp_path / "seed")
    settings = TrainSettings(steps=25, lr=1e-2, warmup_steps=0, seq_len=SEQ, batch_size=8, precision="fp32",
                             device="cpu", weight_decay=0.1)
    paths = {}
    for domain, blocks in DOMAINS.items():
        model, _ = load_causal_lm(str(seed_dir))
        freeze_shared(model, train_what)
        train(model, blocks[:40], settings)
        paths[domain] = save(model.eval(), tmp_path / f"{train_what}-{domain}")
    return seed_dir, paths


def test_frozen_shared_weights_stay_the_seeds_and_the_oracle_loss_is_the_experts(tmp_path):
    seed_dir, paths = trained_experts(tmp_path, "ffn")
    seed = CheckpointReader(seed_dir)
    kinds = kinds_of(load_causal_lm(str(seed_dir))[0])
    for path in paths.values():
        expert = CheckpointReader(path)
        for name, kind in kinds.items():
            assert torch.equal(expert.get(name), seed.get(name)) == (kind != "ffn"), name  # only FFNs moved
    heldout = {d: torch.from_numpy(b[40:]) for d, b in DOMAINS.items()}
    report = merge_cost.measure(mixed(tmp_path, paths), paths, seed=seed_dir, merge_weights={"up": 0.5, "skip": 0.5},
                                heldout=heldout, tokens=4 * SEQ)
    seed_model = load_causal_lm(str(seed_dir))[0]
    for domain, losses in report["losses"].items():
        assert losses["oracle"] == pytest.approx(losses["expert"], abs=1e-5), domain
        seed_loss = -token_logprobs(seed_model, heldout[domain][:4].numpy(), batch_size=4).mean()
        assert losses["expert"] < seed_loss - 0.3, (domain, losses, seed_loss)  # the expert did learn
    assert report["tokens_per_domain"] == {"up": 4 * SEQ, "skip": 4 * SEQ}
    for kind in ("embeddings", "attention", "norms"):
        assert set(report["distances"]["kinds"][kind]["merged_distance"].values()) == {0.0}
    assert min(report["distances"]["kinds"]["ffn"]["distance"].values()) > 0


def test_averaged_shared_weights_cost_each_domain_and_the_report_says_where(tmp_path):
    seed_dir, paths = trained_experts(tmp_path, "all")
    heldout = {d: torch.from_numpy(b[40:]) for d, b in DOMAINS.items()}
    report = merge_cost.measure(mixed(tmp_path, paths), paths, seed=seed_dir, merge_weights={"up": 0.5, "skip": 0.5},
                                heldout=heldout, tokens=4 * SEQ, settings={"branch.train": "all"})
    for domain, losses in report["losses"].items():
        assert losses["oracle"] > losses["expert"] + 0.05, (domain, losses)
    attention = report["distances"]["kinds"]["attention"]
    assert min(attention["merged_distance"].values()) > 0 and min(attention["distance"].values()) > 0
    text = merge_cost.markdown(report)
    assert "| up |" in text and "| attention |" in text and "`branch.train: all`" in text
    assert merge_cost.summary(report)["merge"] > 0.05 and len(merge_cost.notes(report)) == 4


# --- the finetune's router warm-up ----------------------------------------------------------------

def test_router_warmup_trains_only_the_routers_then_everything(tmp_path):
    seed = dense("llama")
    paths = {n: save(ffn_branch(seed, i + 1), tmp_path / n) for i, n in enumerate(("a", "b", "c"))}
    moe_dir = mixed(tmp_path, paths)
    settings = TrainSettings(steps=3, lr=1e-2, warmup_steps=0, seq_len=SEQ, batch_size=4, precision="fp32",
                             device="cpu", weight_decay=0.1)
    blocks = np.concatenate(list(DOMAINS.values()))
    plan = RoutingPlan("top_k", top_k=2, load_balancing=True, alpha=0.01)

    def trained(steps: int) -> tuple[dict, dict]:
        model, _ = load_causal_lm(str(moe_dir), allow_moe=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        configure(model, plan)
        train(model, blocks, settings.model_copy(update={"steps": steps}),
              objective=RouterObjective(model, plan, router_warmup_steps=3))
        return before, dict(model.named_parameters())

    before, after = trained(3)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.endswith("mlp.gate.weight")}  # every router, nothing else
    before, after = trained(5)
    assert any("self_attn" in n and not torch.equal(before[n], after[n]) for n in before)  # then everything


def test_router_lr_moves_the_routers_at_their_own_rate(tmp_path):
    """Adam's first step moves each weight by about its lr: the routers by `router_lr`, the rest by
    the run's own lr."""
    seed = dense("llama")
    paths = {n: save(ffn_branch(seed, i + 1), tmp_path / n) for i, n in enumerate(("a", "b"))}
    model, _ = load_causal_lm(str(mixed(tmp_path, paths)), allow_moe=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = RoutingPlan("top_k", top_k=2, load_balancing=True, alpha=0.01)
    configure(model, plan)
    settings = TrainSettings(steps=1, lr=1e-6, warmup_steps=0, seq_len=SEQ, batch_size=4, precision="fp32",
                             device="cpu", weight_decay=0.0)
    train(model, np.concatenate(list(DOMAINS.values())), settings,
          objective=RouterObjective(model, plan, router_lr=1e-2))
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    routers = [m for n, m in moved.items() if n.endswith("mlp.gate.weight")]
    others = [m for n, m in moved.items() if not n.endswith("mlp.gate.weight")]
    assert routers and min(routers) == pytest.approx(1e-2, rel=0.05)
    assert max(others) == pytest.approx(1e-6, rel=0.05)


# --- the shared merge's rule: the seed kept out of the *mean* only --------------------------------

def ci_with(**mix_lines):
    raw = yaml.safe_load(CI.read_text())
    raw["domains"] = raw["domains"][:2]
    raw["mix"] = {"router_init": "normal", **mix_lines}  # mixed below without sample text
    return parse_config(raw)


@pytest.fixture()
def three(tmp_path):
    seed = dense("llama")
    paths = {GENERALIST: save(seed, tmp_path / "seed")}
    for i, name in enumerate(("math", "code")):
        model = ffn_branch(seed, i + 1)
        with torch.no_grad():  # the domain experts' shared weights differ from the seed's
            model.get_parameter("model.layers.0.self_attn.q_proj.weight").add_(0.1 * (i + 1))
        paths[name] = save(model, tmp_path / name)
    paths = {n: paths[n] for n in ("math", "code", GENERALIST)}
    return [Expert(n, p) for n, p in paths.items()]


def q_proj(tmp_path, experts, options, tag) -> torch.Tensor:
    out = tmp_path / tag
    out.mkdir()
    mix(experts, options, out)
    return CheckpointReader(out).get("model.layers.0.self_attn.q_proj.weight")


def test_copy_from_the_seed_works_under_the_default_config(tmp_path, three):
    options = options_from_config(ci_with(shared_policy="copy", copy_from=GENERALIST))
    assert options.shared_exclude == ()  # seed_in_shared_mean: false is about the mean
    seed_q = CheckpointReader(three[2].path).get("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(q_proj(tmp_path, three, options, "copy"), seed_q)


def test_weighted_honours_the_weight_given_to_the_seed(tmp_path, three):
    options = options_from_config(ci_with(shared_policy="weighted", weights={"math": 1, "code": 1, GENERALIST: 2}))
    q = {e.name: CheckpointReader(e.path).get("model.layers.0.self_attn.q_proj.weight") for e in three}
    expected = (q["math"] + q["code"] + 2 * q[GENERALIST]) / 4
    torch.testing.assert_close(q_proj(tmp_path, three, options, "w"), expected, rtol=0, atol=1e-7)
    mean = options_from_config(ci_with())  # the default: the mean over the domain experts only
    torch.testing.assert_close(q_proj(tmp_path, three, mean, "m"), (q["math"] + q["code"]) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize("options, needle", [
    (MixOptions(shared_policy="weighted", weights={"math": 1, "code": 1, GENERALIST: 1}, shared_exclude=(GENERALIST,)),
     "expert seed has weight 1 in the shared merge and is also excluded"),
    (MixOptions(shared_policy="weighted", weights={"math": 1}), "needs a weight for every expert; missing: code, seed"),
    (MixOptions(shared_policy="weighted", weights={"math": 0, "code": 0, GENERALIST: 0}), "positive sum"),
    (MixOptions(shared_policy="copy", copy_from=GENERALIST, shared_exclude=(GENERALIST,)),
     "expert seed is the one the shared tensors are copied from and is also excluded"),
], ids=["weight-and-excluded", "missing-weight", "all-zero", "copy-excluded"])
def test_a_weight_is_never_silently_zeroed(tmp_path, three, options, needle):
    out = tmp_path / "moe"
    out.mkdir()
    with pytest.raises(MixInputError, match=needle):
        mix(three, options, out)
    assert list(out.iterdir()) == []


def test_config_weights_name_every_expert():
    with pytest.raises(ConfigError, match="needs a weight for every expert; missing: seed"):
        ci_with(shared_policy="weighted", weights={"math": 1, "code": 1})


def test_every_random_seed_measures_the_merge_on_the_same_heldout_blocks():
    """The merge cost and routing report of `btx compare`'s seeds compare like with like: their
    held-out sample follows `compare.eval_seed`, not the run's random seed (the centroid init's
    training sample still does)."""
    from types import SimpleNamespace

    from btx_core.stages.mix import routing_samples

    raw = yaml.safe_load(CI.read_text())
    splits = {d: SimpleNamespace(train=np.arange(400 * SEQ).reshape(400, SEQ) + 10_000 * i,
                                 heldout=np.arange(200 * SEQ).reshape(200, SEQ) + 10_000 * i)
              for i, d in enumerate(("math", "code"))}
    owners = {"math": "math", "code": "code", GENERALIST: None}

    def samples(seed: int, eval_seed: int = 7):
        config = parse_config({**raw, "expert_training": {**raw["expert_training"], "seed": seed},
                               "compare": {**raw.get("compare", {}), "eval_seed": eval_seed}})
        return routing_samples(config, splits, owners)
    first, second, other_sets = samples(0), samples(1), samples(0, eval_seed=8)
    for d in splits:
        assert torch.equal(first.heldout[d], second.heldout[d])
        assert not torch.equal(first.heldout[d], other_sets.heldout[d])
        assert not torch.equal(first.centroid[d], second.centroid[d])
    sample_blocks = (raw.get("mix") or {}).get("sample_blocks", 32)
    assert first.centroid[GENERALIST] is None and len(first.heldout["math"]) == sample_blocks
