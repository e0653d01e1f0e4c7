"""`btx compare`'s budgets: configs/results.yaml in the paper's shape (the experts get most of BTX's
training FLOPs), and device time as the paper's GPU-days (wall time x devices), matched from
measured seconds per step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from btx_core.config.load import load_config, parse_config
from btx_core.errors import ConfigError
from btx_core.stages.compare import planned_compute
from btx_core.training.compute import Budgets, device_seconds, flops_per_token, time_matched

RESULTS = Path(__file__).resolve().parent.parent.parent / "configs" / "results.yaml"


def test_results_config_gives_the_experts_at_least_70_percent_of_btx_flops():
    config = load_config(RESULTS, check_environment=False)
    planned = planned_compute(config)
    assert planned["expert_flop_share"] >= 0.70  # paper, Table 3: 77 % experts, 23 % MoE-finetuning
    # The share is the library's FLOP count, reproduced here from its parts.
    spec, et, ft = config.seed.create, config.expert_training, config.finetune.training
    dense = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
             "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
             "num_key_value_heads": spec.num_kv_heads, "vocab_size": spec.vocab_size}
    moe = {**dense, "num_local_experts": len(config.domains) + 1, "num_experts_per_tok": 2}
    experts = len(config.domains) * et.steps * et.tokens_per_step * flops_per_token(dense, et.seq_len)
    finetune = ft.steps * ft.tokens_per_step * flops_per_token(moe, ft.seq_len)
    assert planned["expert_flops"] == pytest.approx(experts)
    assert planned["finetune_flops"] == pytest.approx(finetune)
    assert config.mix.include_seed and config.mix.top_k == 2 and config.finetune.routing == "top_k"
    assert len(config.compare.seeds) == 3 and config.compare.eval_blocks >= 64
    assert config.seed.pretrain_data.builtin == "prose"


def test_the_previous_shape_fails_the_share_check():
    config = load_config(RESULTS, check_environment=False)
    inverted = config.model_copy(update={
        "expert_training": config.expert_training.model_copy(update={"steps": 40}),
        "finetune": config.finetune.model_copy(update={
            "training": config.finetune.training.model_copy(update={"steps": 100})})})
    assert planned_compute(inverted)["expert_flop_share"] == pytest.approx(0.43, abs=0.01)


def test_device_seconds_are_wall_time_times_devices_over_all_steps():
    assert device_seconds({"wall_s": 10.0, "steps": 20}) == 10.0  # one device when not recorded
    assert device_seconds({"wall_s": 10.0, "steps": 20, "devices": 4}) == 40.0
    # A resumed stage measured only its last 5 of 20 steps: scaled to all 20.
    assert device_seconds({"wall_s": 10.0, "steps": 20, "resumed_from_step": 15, "devices": 2}) == 80.0


def test_time_matched_steps_spend_btx_device_time_at_each_baselines_measured_speed():
    budgets = Budgets(btx_tokens=1000, btx_flops=1e9, moe_over_dense=1.6, upcycle_tokens=10,
                      upcycle_flops=7, dense_tokens=10, dense_flops=12)
    matched = time_matched(budgets, 300.0, upcycle_step_s=1.3, dense_step_s=0.35)
    assert matched.steps("upcycle-time") == round(300 / 1.3) == 231
    assert matched.steps("dense-time") == round(300 / 0.35) == 857
    assert matched.steps("upcycle-tokens") == 10 and matched.to_dict()["btx_device_s"] == 300.0
    assert time_matched(budgets, 0.1, upcycle_step_s=1.3, dense_step_s=0.35).steps("dense-time") == 1
    with pytest.raises(ValueError, match="positive"):
        time_matched(budgets, 300.0, upcycle_step_s=0.0, dense_step_s=0.35)


def test_an_expert_with_frozen_shared_weights_is_charged_for_the_gradients_it_computes():
    """Forward 2N and the activations' gradients 2N always; the weights' gradients only for the
    weights that train: an FFN-only expert (`branch.train: ffn`) costs 4N + 2 N_ffn a token."""
    from btx_core.training.compute import active_parameters, ffn_fraction, flops_per_token

    dense = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 4096}
    n, attention = active_parameters(dense), 12.0 * 6 * 4 * 64 * 256
    assert flops_per_token(dense, 256) == pytest.approx(6 * n + attention)
    ffn = 6 * 3 * 256 * 1024
    assert ffn_fraction(dense) == pytest.approx(ffn / n)
    assert flops_per_token(dense, 256, ffn_fraction(dense)) == pytest.approx(4 * n + 2 * ffn + attention)



@pytest.mark.parametrize(("matchings", "says"), [
    (["time"], "add `tokens` or `flops` to compare.matchings"),
    (["tokens", "tokens"], "name each matching once"),
    ([], "compare.matchings"),
    (["steps"], "compare.matchings"),
])
def test_compare_matchings_refuse_what_cannot_be_matched(matchings, says):
    raw = load_config(RESULTS, check_environment=False).model_dump(mode="json")
    raw["compare"]["matchings"] = matchings
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_config(raw)
    raw["compare"]["matchings"] = ["flops", "time"]
    assert parse_config(raw).compare.matchings == ["flops", "time"]
