"""How a loaded MoE routes and what it is trained with: routing strategies, the load-balancing
loss (the paper's, per layer, or transformers' own), frozen expert FFNs.

A routing strategy configures the MoE blocks of a loaded transformers model in place, so that the
finetuned checkpoint is a stock MoE (Mixtral, Qwen2/3-MoE, FlexOlmo) that routes the way it was trained:
- `top_k`: softmax over the top-k router logits (Mixtral; the paper's default, k = 2).
- `soft`: every expert, weighted by the full softmax. The routers renormalise their top-k
  probabilities (mix sets norm_topk_prob where a target has it), so k = number of experts *is*
  soft routing, in training and after loading.
- `sample_top1`: in training, each token goes to one expert sampled from the router's softmax
  (Gumbel-max), at weight 1 in the forward pass and with the Gumbel-softmax gradient at a
  temperature annealed over the finetune (straight-through, Jang et al. 2017, arXiv 1611.01144);
  in eval mode and after loading, the stock top-1 router (argmax, weight 1).
Switch top-1 with a capacity factor would be a further entry of `ROUTING`.

The load-balancing loss (BTX section 2.4) is, for each MoE layer l, alpha N sum_i u_i p_i from that
layer's router logits, summed over layers: u_i the share of the layer's routed slots that go to
expert i (a top-k token counts 1/k for each of its experts, so sum_i u_i = 1), p_i the mean router
probability of expert i. At perfect balance it is alpha per layer. transformers' own loss counts
a top-k token once per expert (k x the paper's at balance) and pools u and p over all layers
before the product, so one layer's imbalance is not corrected in that layer; it stays an option.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from btx_core.errors import BTXError
from btx_core.model.families import MOE_TARGETS, MoETarget

LOSSES = ("paper", "transformers")


@dataclass(frozen=True)
class RoutingPlan:
    """What one finetuning run asks of the routers."""

    strategy: str
    top_k: int
    """Experts per token for `top_k`; for `soft`, the k of the load-balancing loss's u (below)."""
    load_balancing: bool
    alpha: float
    """The paper's coefficient per layer."""
    loss: str = "paper"
    """`paper`: the per-layer loss, computed by the training loop from the router logits;
    `transformers`: the model's own aux loss at coefficient alpha x num_layers."""
    temperature: tuple[float, float] | None = None
    """`sample_top1`: the Gumbel-softmax temperature at the first and the last step."""

    @property
    def balance_top_k(self) -> int:
        """The k whose top-k mask gives u in the paper's loss. Soft routing sends every token to
        every expert, so its u would be uniform and the loss a constant without a gradient;
        btx counts the top-k experts the router would pick instead, so an expert that no token
        ranks among its first k (soft routing's dead expert) is still pushed back."""
        return 1 if self.strategy == "sample_top1" else self.top_k


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


# --- routing strategies ----------------------------------------------------------------------------

class GumbelTop1:
    """Mixed into a family's top-k router class (so transformers still records its logits):
    sample top-1 in training, the stock router otherwise."""

    temperature: float = 1.0

    def forward(self, hidden_states):
        logits, scores, indices = super().forward(hidden_states)
        if not self.training:
            return logits, scores, indices
        uniform = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-20, 1.0)
        perturbed = logits.float() - torch.log(-torch.log(uniform))  # + Gumbel(0, 1) noise
        chosen = perturbed.argmax(-1, keepdim=True)  # a sample of softmax(logits) (Gumbel-max)
        relaxed = torch.softmax(perturbed / self.temperature, dim=-1).gather(-1, chosen)
        # Straight-through: weight exactly 1 forward (as top-1 after loading), relaxed gradient back.
        weight = (relaxed - relaxed.detach()) + 1.0
        return logits, weight.to(scores.dtype), chosen


class ForcedExpert:
    """Mixed into a family's top-k router class: every token goes to expert `expert` alone, at
    weight exactly 1 (the oracle routing of the merge-cost report); the logits stay the router's."""

    expert: int = 0

    def forward(self, hidden_states):
        logits, scores, indices = super().forward(hidden_states)
        return logits, torch.ones_like(scores[:, :1]), torch.full_like(indices[:, :1], self.expert)


_MIXED_CLASSES: dict[tuple[type, type], type] = {}


def _mix_into(router: torch.nn.Module, mixin: type) -> None:
    """Give `router` the forward of `mixin` over its own class: same parameters, names and hooks."""
    cls = type(router)
    if isinstance(router, mixin):
        return
    if (mixin, cls) not in _MIXED_CLASSES:
        _MIXED_CLASSES[mixin, cls] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {})
    router.__class__ = _MIXED_CLASSES[mixin, cls]


class forced_expert:
    """Within the block, every MoE layer of `model` routes every token to expert `index` alone,
    at weight 1: the mixed model as that expert's dense model would compute it, if the merge
    lost nothing (BTX's shared weights are a merge; FlexOlmo-style frozen ones are the seed's)."""

    def __init__(self, model, index: int):
        self.routers = [block.gate for block in moe_blocks(model)]
        if not 0 <= index < model.config.num_experts:
            raise BTXError(f"expert {index} is not one of the model's {model.config.num_experts} experts")
        self.index = index

    def __enter__(self):
        self.classes = [type(r) for r in self.routers]
        for router in self.routers:
            _mix_into(router, ForcedExpert)
            router.expert = self.index
        return self

    def __exit__(self, *exc) -> None:
        for router, cls in zip(self.routers, self.classes):
            router.__class__ = cls


def gumbel_temperature(step: int, total_steps: int, start: float, end: float) -> float:
    """Exponential decay from `start` at the first step to `end` at the last (Jang et al. anneal
    exponentially; BTX gives no schedule that btx could read offline)."""
    if total_steps <= 1:
        return end
    return start * (end / start) ** (min(step, total_steps - 1) / (total_steps - 1))


def top_k_routing(model, plan: RoutingPlan) -> None:
    _set_top_k(model, plan.top_k)


def soft_routing(model, plan: RoutingPlan) -> None:
    _set_top_k(model, model.config.num_experts)


def sample_top1_routing(model, plan: RoutingPlan) -> None:
    if plan.temperature is None or min(plan.temperature) <= 0:
        raise BTXError("sample_top1 routing needs a positive (start, end) temperature")
    _set_top_k(model, 1)
    for block in moe_blocks(model):
        _mix_into(block.gate, GumbelTop1)
        block.gate.temperature = plan.temperature[0]


ROUTING = {"top_k": top_k_routing, "soft": soft_routing, "sample_top1": sample_top1_routing}


def configure(model, plan: RoutingPlan) -> None:
    """Routing and the load-balancing loss of a loaded MoE, for training and for its saved config.

    The saved config keeps transformers' `router_aux_loss_coef` = alpha x num_layers whichever loss
    trains (a stock config, as MiX wrote it); with the paper's loss the model's own coefficient is
    0 during training, so the loss is not counted twice (`RouterObjective` adds the paper's)."""
    if plan.loss not in LOSSES:
        raise BTXError(f"unknown load-balancing loss {plan.loss!r}; known: {', '.join(LOSSES)}")
    try:
        strategy = ROUTING[plan.strategy]
    except KeyError:
        raise BTXError(f"unknown routing {plan.strategy!r}; known: {', '.join(ROUTING)}") from None
    strategy(model, plan)
    coefficient = aux_loss_coefficient(plan.alpha, model.config.num_hidden_layers)
    model.config.output_router_logits = plan.load_balancing
    model.config.router_aux_loss_coef = coefficient
    model.router_aux_loss_coef = coefficient if plan.loss == "transformers" else 0.0


def aux_loss_coefficient(alpha: float, num_layers: int) -> float:
    """transformers averages its load-balancing loss over layers; the paper sums alpha x L_LB per
    layer, hence alpha x num_layers. transformers' loss counts a top-k token k times, so at
    perfect balance this is k x the paper's (tests/unit/test_load_balancing.py)."""
    return alpha * num_layers


# --- the paper's load-balancing loss -------------------------------------------------------------

def layer_balance_losses(router_logits, top_k: int, alpha: float,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """alpha N sum_i u_i p_i for each layer's router logits [tokens, N] (shape [layers]).
    u_i: the share of the layer's routed slots that reach expert i (a token's k slots weigh 1/k
    each); p_i: the mean router probability of expert i. `attention_mask` [batch, seq] (1 = real
    token) leaves padding out of both means."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        experts = probs.shape[-1]
        slots = torch.zeros_like(probs).scatter_(-1, logits.topk(top_k, dim=-1).indices, 1.0 / top_k)
        if attention_mask is None:
            u, p = slots.mean(0), probs.mean(0)
        else:
            weight = attention_mask.reshape(-1, 1).to(probs.device, torch.float32)
            weight = weight / weight.sum().clamp(min=1.0)
            u, p = (slots * weight).sum(0), (probs * weight).sum(0)
        losses.append(alpha * experts * (u * p).sum())
    return torch.stack(losses)


def paper_load_balancing_loss(router_logits, top_k: int, alpha: float,
                              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """BTX's L_LB summed over layers: alpha x num_layers at perfect balance."""
    return layer_balance_losses(router_logits, top_k, alpha, attention_mask).sum()


class RouterObjective:
    """What MoE finetuning adds to the LM loss in the training loop (`training.loop.Objective`):
    the paper's load-balancing loss from the router logits the model returns, and the
    temperature schedule of sample top-1 routing."""

    def __init__(self, model, plan: RoutingPlan, seed: int = 0, router_warmup_steps: int = 0,
                 router_lr: float | None = None):
        self.plan, self.seed, self.warmup, self.router_lr = plan, seed, router_warmup_steps, router_lr
        self.routers = [block.gate for block in moe_blocks(model)]

    def learning_rates(self, model) -> dict[int, float]:
        """The routers' own learning rate, when set, for `model` (the module that trains)."""
        if self.router_lr is None:
            return {}
        return {id(p): self.router_lr for block in moe_blocks(model) for p in block.gate.parameters()}

    def held_parameters(self, step: int, model) -> list[torch.nn.Parameter]:
        """The router warm-up: in its first steps every trainable parameter of `model` (the module
        that trains: the model, or its FSDP copy) but the routers keeps its value; after, none."""
        if step >= self.warmup:
            return []
        routers = {id(p) for block in moe_blocks(model) for p in block.gate.parameters()}
        return [p for p in model.parameters() if p.requires_grad and id(p) not in routers]

    def at_step(self, step: int, total_steps: int) -> None:
        if self.plan.strategy == "sample_top1":
            temperature = gumbel_temperature(step, total_steps, *self.plan.temperature)
            for router in self.routers:
                router.temperature = temperature
            # The Gumbel noise, like the data order, a pure function of (seed, step, rank): a rerun
            # or a resumed run samples the same experts whatever the process did before. Through
            # torch's global generator, which activation checkpointing replays in its recompute.
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            torch.manual_seed(int(np.random.SeedSequence([self.seed, step, rank]).generate_state(1)[0]))

    def extra_loss(self, outputs, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        if not (self.plan.load_balancing and self.plan.loss == "paper"):
            return None  # off, or transformers' own loss is already in outputs.loss
        logits = getattr(outputs, "router_logits", None)
        if not logits:
            raise BTXError("the model returned no router logits: the paper's load-balancing loss "
                           "needs config.output_router_logits on (routing.configure sets it)")
        return paper_load_balancing_loss(logits, self.plan.balance_top_k, self.plan.alpha, attention_mask)


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
