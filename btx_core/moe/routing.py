"""How a loaded MoE routes and what it is trained with: routing strategies, the load-balancing
loss (the paper's form and transformers' scaling of it), frozen expert FFNs.

A routing strategy configures the MoE blocks of a loaded transformers model in place, so that the
finetuned checkpoint is a stock MoE (Mixtral, Qwen2/3-MoE, FlexOlmo) that routes the way it was trained:
- `top_k`: softmax over the top-k router logits (Mixtral; the paper's default, k = 2).
- `soft`: every expert, weighted by the full softmax. The routers renormalise their top-k
  probabilities (mix sets norm_topk_prob where a target has it), so k = number of experts *is*
  soft routing, in training and after loading.
Switch top-1 (capacity factor) and sample top-1 (Gumbel) need a router forward of their own
(dropped tokens take index `num_experts`, which Mixtral's experts skip); they would be further
entries of `ROUTING`, replacing each block's `gate` module while keeping its `weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from btx_core.errors import BTXError
from btx_core.model.families import MOE_TARGETS, MoETarget


@dataclass(frozen=True)
class RoutingPlan:
    """What one finetuning run asks of the routers."""

    strategy: str
    top_k: int
    load_balancing: bool
    alpha: float
    """The paper's coefficient per layer."""


def moe_target(model) -> MoETarget:
    target = MOE_TARGETS.get(getattr(model.config, "model_type", None))
    if target is None:
        raise BTXError(f"{type(model).__name__} is not an MoE btx can finetune "
                       f"(known: {', '.join(MOE_TARGETS)}); mix the experts first")
    return target


def moe_blocks(model) -> list[torch.nn.Module]:
    target = moe_target(model)
    return [model.get_submodule(target.block.format(layer=i))
            for i in range(model.config.num_hidden_layers)]


def _set_top_k(model, k: int) -> None:
    experts = model.config.num_experts  # every target's config maps this name to its own key
    if not 1 <= k <= experts:
        raise BTXError(f"top_k {k} is not between 1 and the model's {experts} experts: lower it")
    model.config.num_experts_per_tok = k
    model.num_experts_per_tok = k  # what each *ForCausalLM passes to its load-balancing loss
    for block in moe_blocks(model):
        if hasattr(block, "top_k"):  # Mixtral's block keeps a copy; the others only the router
            block.top_k = k
        block.gate.top_k = k


def top_k_routing(model, plan: RoutingPlan) -> None:
    _set_top_k(model, plan.top_k)


def soft_routing(model, plan: RoutingPlan) -> None:
    _set_top_k(model, model.config.num_experts)


ROUTING = {"top_k": top_k_routing, "soft": soft_routing}


def configure(model, plan: RoutingPlan) -> None:
    """Routing and the load-balancing loss of a loaded MoE, for training and for its saved config."""
    try:
        ROUTING[plan.strategy](model, plan)
    except KeyError:
        raise BTXError(f"unknown routing {plan.strategy!r}; known: {', '.join(ROUTING)}") from None
    coefficient = aux_loss_coefficient(plan.alpha, model.config.num_hidden_layers)
    model.config.output_router_logits = plan.load_balancing
    model.config.router_aux_loss_coef = coefficient
    model.router_aux_loss_coef = coefficient


def aux_loss_coefficient(alpha: float, num_layers: int) -> float:
    """transformers averages the load-balancing loss over layers; the paper sums alpha x L_LB
    per layer, so the Mixtral coefficient is alpha x num_layers. Exact at perfect balance and
    whenever the layers route alike; otherwise transformers' loss (u and p pooled over layers
    before the product) is a little below the per-layer sum (tests/test_finetune.py)."""
    return alpha * num_layers


def paper_load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, alpha: float) -> torch.Tensor:
    """BTX eq. (L_LB = alpha N sum_i u_i p_i) summed over layers: u_i is the fraction of tokens
    routed to expert i (a token counts for each of its top-k experts), p_i the mean router
    probability of expert i. Written independently of transformers, to check its scaling."""
    total = torch.zeros(())
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n = probs.shape[-1]
        chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
        total = total + alpha * n * (chosen.mean(0) * probs.mean(0)).sum()
    return total


def freeze_experts(model) -> int:
    """Stop gradients to every expert FFN; returns the number of frozen parameters."""
    target, frozen = moe_target(model), 0
    for block in moe_blocks(model):
        for name in target.expert_params:
            param = block.get_parameter(name)
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


class lm_loss_only:
    """Within the block, the model's loss is the LM loss alone (no load-balancing term), as every
    held-out loss is measured; dense models pass through."""

    def __init__(self, model):
        self.config = model.config

    def __enter__(self):
        self.saved = getattr(self.config, "output_router_logits", None)
        if self.saved is not None:
            self.config.output_router_logits = False
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            self.config.output_router_logits = self.saved
