"""Compute accounting: training FLOPs per token of a dense or MoE model, device time, and the budgets
that match a baseline to BTX in training tokens, in training FLOPs, or in measured device time.

FLOPs follow PaLM (Chowdhery et al., 2022, appendix B): 6 x N + 12 x L x (heads x head_dim) x T per
trained token, N the matmul parameters a token passes through (attention, its k experts' FFNs,
the router, the LM head; embedding lookups are free) and T the sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple


def active_parameters(config: Mapping) -> int:
    """Matmul parameters one token passes through (MoE: only its top-k experts)."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    ffn = 3 * h * config["intermediate_size"]
    experts = config.get("num_local_experts") or config.get("num_experts")  # Mixtral/Qwen3-MoE, Qwen2-MoE/FlexOlmo
    if experts:  # an MoE layer: k experts' FFNs and the router
        ffn = config["num_experts_per_tok"] * ffn + h * experts
    return layers * (attention + ffn) + vocab * h


def flops_per_token(config: Mapping, seq_len: int, trained: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per token. `trained`: the fraction of the matmul weights
    that train. The forward pass costs 2N and the activations' gradients 2N whatever trains; the
    weights' gradients 2N for the weights that train only (an expert with frozen shared weights,
    `branch.train: ffn`, pays about 4N + 2 N_ffn)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return ((4.0 + 2.0 * trained) * active_parameters(config)
            + 12.0 * config["num_hidden_layers"] * heads * head_dim * seq_len)


def ffn_fraction(config: Mapping) -> float:
    """The FFNs' share of a dense model's matmul weights: what trains with frozen shared weights."""
    return config["num_hidden_layers"] * 3 * config["hidden_size"] * config["intermediate_size"] / active_parameters(config)


def trained_fraction(model) -> float:
    """The fraction of a model's matmul weights (its 2-D parameters) that train."""
    sizes = [(p.numel(), p.requires_grad) for p in model.parameters() if p.dim() >= 2]
    total = sum(n for n, _ in sizes)
    return sum(n for n, trains in sizes if trains) / total if total else 1.0


class StageCompute(NamedTuple):
    """One training stage's cost."""

    tokens: int
    flops: float


@dataclass(frozen=True)
class Budgets:
    """BTX's training cost after the seed, and the steps that match a baseline to it."""

    btx_tokens: int
    btx_flops: float
    moe_over_dense: float
    """FLOPs of one MoE token over one dense token (at the finetuning sequence length)."""
    upcycle_tokens: int
    upcycle_flops: int
    dense_tokens: int
    dense_flops: int
    btx_device_s: float = 0.0
    """BTX's device-seconds after the seed: each stage's wall time x devices (the paper's GPU-days)."""
    upcycle_step_s: float = 0.0
    """Measured device-seconds per finetuning step of sparse upcycling (0: not measured yet)."""
    dense_step_s: float = 0.0
    upcycle_time: int = 0
    dense_time: int = 0

    def steps(self, name: str) -> int:
        return {"upcycle-tokens": self.upcycle_tokens, "upcycle-flops": self.upcycle_flops,
                "upcycle-time": self.upcycle_time, "dense-tokens": self.dense_tokens,
                "dense-flops": self.dense_flops, "dense-time": self.dense_time}[name]

    def to_dict(self) -> dict:
        return asdict(self)


def matched_budgets(stages: list[StageCompute], *, tokens_per_step: int, dense_fpt: float,
                    moe_fpt: float) -> Budgets:
    """Steps of the finetuning recipe (`tokens_per_step` each) that give sparse upcycling (an MoE)
    and the dense baseline the same training tokens, or the same training FLOPs, as BTX's
    `stages` (its experts and its MoE finetuning)."""
    tokens = sum(s.tokens for s in stages)
    flops = sum(s.flops for s in stages)

    def steps(value: float, per_step: float) -> int:
        return max(1, round(value / per_step))

    return Budgets(btx_tokens=tokens, btx_flops=flops, moe_over_dense=moe_fpt / dense_fpt,
                   upcycle_tokens=steps(tokens, tokens_per_step),
                   upcycle_flops=steps(flops, tokens_per_step * moe_fpt),
                   dense_tokens=steps(tokens, tokens_per_step),
                   dense_flops=steps(flops, tokens_per_step * dense_fpt))


def device_seconds(metrics: Mapping) -> float:
    """A training stage's device time from its manifest metrics: wall time x devices, scaled up to
    all its steps when it resumed (the wall time counts only the steps of the last process)."""
    trained = metrics["steps"] - metrics.get("resumed_from_step", 0)
    return metrics["wall_s"] * metrics.get("devices", 1) * metrics["steps"] / max(trained, 1)


def time_matched(budgets: Budgets, btx_device_s: float, *, upcycle_step_s: float,
                 dense_step_s: float) -> Budgets:
    """`budgets` plus the steps that give sparse upcycling and the dense baseline BTX's device time,
    from each one's measured device-seconds per step."""
    def steps(per_step: float) -> int:
        if per_step <= 0:
            raise ValueError(f"device-seconds per step must be positive, got {per_step}")
        return max(1, round(btx_device_s / per_step))

    return replace(budgets, btx_device_s=btx_device_s, upcycle_step_s=upcycle_step_s,
                   dense_step_s=dense_step_s, upcycle_time=steps(upcycle_step_s),
                   dense_time=steps(dense_step_s))


def human_flops(flops: float) -> str:
    if flops <= 0:
        return "0"
    exponent = min(int(math.log10(flops) // 3), 5)
    return f"{flops / 10 ** (3 * exponent):.3g}{['', 'K', 'M', 'G', 'T', 'P'][exponent]}"
