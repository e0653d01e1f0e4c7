"""The paper's ablations (BTX sections 4.3-4.4), each one line of a config: router init, load
balancing off or transformers' form, the seed in or out of the shared mean, top-2 vs soft vs
sample top-1 routing. Here: each line validates and reaches what the stage runs; the stages
themselves with those options are tested in test_finetune.py (routing, load balancing),
test_mix_stage.py (centroid init from a config) and test_load_balancing.py."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from btx_core.config.load import parse_config
from btx_core.errors import ConfigError
from btx_core.model.tensor_io import CheckpointReader
from btx_core.moe.mix import Expert, mix
from btx_core.stages.finetune import routing_plan
from btx_core.stages.mix import GENERALIST, options_from_config
from tests.pico import branch, dense

CI = Path(__file__).parents[2] / "configs" / "ci.yaml"


def with_line(dotted: str, value):
    """configs/ci.yaml (two domains) with one line added."""
    raw = yaml.safe_load(CI.read_text())
    raw["domains"] = raw["domains"][:2]
    section, key = dotted.split(".")
    raw.setdefault(section, {})[key] = value
    return parse_config(raw)


@pytest.mark.parametrize("init", ["normal", "centroid", "zeros"])
def test_router_init_line(init):
    assert options_from_config(with_line("mix.router_init", init)).router_init == init


def test_default_finetune_is_the_papers():
    plan = routing_plan(with_line("mix.top_k", 2))
    assert (plan.strategy, plan.top_k, plan.load_balancing, plan.alpha, plan.loss) == ("top_k", 2, True, 0.01, "paper")


@pytest.mark.parametrize("line,value,expected", [
    ("finetune.load_balancing", False, {"load_balancing": False}),
    ("finetune.load_balancing_loss", "transformers", {"loss": "transformers"}),
    ("finetune.load_balancing_alpha", 0.1, {"alpha": 0.1}),
    ("finetune.routing", "soft", {"strategy": "soft", "top_k": 2, "temperature": None}),
    ("finetune.routing", "sample_top1", {"strategy": "sample_top1", "top_k": 1, "temperature": (1.0, 0.1)}),
    ("finetune.top_k", 1, {"strategy": "top_k", "top_k": 1}),
])
def test_finetune_lines(line, value, expected):
    plan = routing_plan(with_line(line, value))
    assert {k: getattr(plan, k) for k in expected} == expected


def test_seed_in_or_out_of_the_shared_mean(tmp_path):
    seed = dense("llama")
    paths = {n: branch(seed, tmp_path / n, seed=i + 1) for i, n in enumerate(["math", "code", GENERALIST])}
    experts = [Expert(n, p) for n, p in paths.items()]
    name = "model.layers.0.self_attn.q_proj.weight"
    each = {n: CheckpointReader(p).get(name) for n, p in paths.items()}
    shared = {}
    for included in (False, True):
        # Mixed without sample text: a random router init instead of the default centroid
        options = replace(options_from_config(with_line("mix.seed_in_shared_mean", included)), router_init="normal")
        out = tmp_path / f"moe-{included}"
        out.mkdir()
        mix(experts, options, out)
        shared[included] = CheckpointReader(out).get(name)
    torch.testing.assert_close(shared[False], (each["math"] + each["code"]) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(shared[True], sum(each.values()) / 3, rtol=0, atol=1e-7)
    # Sparse upcycling mixes copies of the seed: nothing to leave out.
    assert options_from_config(with_line("mix.seed_in_shared_mean", False), upcycle=True).shared_exclude == ()


@pytest.mark.parametrize("line,value,needle", [
    ("finetune.load_balancing_loss", "switch", "paper"),
    ("finetune.routing", "gumbel", "sample_top1"),
    ("finetune.gumbel_temperature", [1.0, 0.0], "temperatures must be > 0"),
])
def test_bad_lines_say_what_is_allowed(line, value, needle):
    with pytest.raises(ConfigError, match=needle):
        with_line(line, value)


def test_top_k_with_sample_top1_is_refused():
    raw = yaml.safe_load(CI.read_text())
    raw["finetune"].update(routing="sample_top1", top_k=2)
    with pytest.raises(ConfigError, match="sample_top1. routes each token to one expert"):
        parse_config(raw)


# --- `btx ablate`: each ablation is one real line of config ----------------------------------------

def test_every_ablation_is_one_line_that_changes_the_config():
    from btx_core.stages.ablate import ABLATIONS, current
    from btx_core.stages.ablate import with_line as ablation_line

    config = parse_config(yaml.safe_load(CI.read_text()))
    for ablation in ABLATIONS:
        changed = ablation_line(config, ablation.line, ablation.value)
        section, key = ablation.line.split(".")
        assert getattr(getattr(changed, section), key) == ablation.value
        assert changed.model_copy(update={section: getattr(config, section)}) == config  # nothing else
    # Every line changes the config, but the one that names its default (ablate skips that one)
    same = [a.name for a in ABLATIONS if current(config, a.line) == a.value]
    assert same == ["router-centroid"] and config.mix.router_init == "centroid"
    with pytest.raises(ConfigError, match="finetune.routing: \"switch\""):
        ablation_line(config, "finetune.routing", "switch")
    with pytest.raises(ConfigError, match="no such setting"):
        ablation_line(config, "mix.capacity_factor", 1.0)


def test_routing_summary_finds_each_domains_own_expert_and_the_least_used_one():
    from btx_core.evaluation.report import routing_layers_markdown, routing_summary

    routing = {"experts": ["math", "code", "generalist"], "top_k": 2,
               "by_domain_top1": {"math": [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]],
                                  "code": [[0.3, 0.6, 0.1], [0.1, 0.8, 0.1]]},
               "load": [[0.5, 0.48, 0.02], [0.3, 0.4, 0.3]]}
    summary = routing_summary(routing)
    assert summary["own_top1"] == {"math": [0.9, 0.2], "code": [0.6, 0.8]}
    assert summary["least_used"] == [("generalist", 0.02), ("math", 0.3)]
    md = routing_layers_markdown(routing)
    assert "| 0 | 90% | 60% | generalist 2.0% |" in md and "uniform router gives every expert 33%" in md

