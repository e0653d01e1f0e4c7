"""Routers of a freshly mixed MoE: how they are initialised, and how they route at the start.

The mixed model is run one layer at a time on small token samples while it is being written
(`LayerwiseProbe`), so data-driven inits see the router's real input, the post-attention-normed
hidden state of the *mixed* model at that layer, and the routing report costs one layer of
memory. Router inits are tiny strategies in a registry (mergekit's pattern); add one there.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from btx_core.errors import BTXError


@dataclass
class RouterContext:
    """What a router init may use for one layer."""

    layer: int
    num_experts: int
    hidden_size: int
    initializer_range: float
    generator: torch.Generator
    inputs: list[torch.Tensor] | None = None
    """Per expert, router inputs [tokens, hidden] of that expert's domain sample (centroid)."""


class NormalInit:
    """N(0, initializer_range^2): what transformers' Mixtral `_init_weights` gives a new router."""

    needs_data = False

    def __call__(self, ctx: RouterContext) -> torch.Tensor:
        return torch.randn(ctx.num_experts, ctx.hidden_size, generator=ctx.generator) * ctx.initializer_range


class ZerosInit:
    """All zeros: every expert equally likely at first (common in sparse upcycling)."""

    needs_data = False

    def __call__(self, ctx: RouterContext) -> torch.Tensor:
        return torch.zeros(ctx.num_experts, ctx.hidden_size)


class UniformInit:
    """U(-1/sqrt(hidden), 1/sqrt(hidden)): nn.Linear's default (kaiming_uniform, a=sqrt(5))."""

    needs_data = False

    def __call__(self, ctx: RouterContext) -> torch.Tensor:
        bound = 1.0 / math.sqrt(ctx.hidden_size)
        return (torch.rand(ctx.num_experts, ctx.hidden_size, generator=ctx.generator) * 2 - 1) * bound


@dataclass
class CentroidInit:
    """Row e = the mean router input of expert e's domain, centred over experts, scaled so the
    mean routing entropy on the sample is `target` x log(num_experts): neither uniform (1.0)
    nor saturated (0.0). Centring makes a generalist whose sample is every domain's tokens
    sit near zero, so it is second choice for everything (the paper's top-2 behaviour)."""

    target: float = 0.5
    needs_data = True

    def __call__(self, ctx: RouterContext) -> torch.Tensor:
        if not ctx.inputs:
            raise BTXError("router init 'centroid' needs each expert's domain text: give sample data")
        centroids = torch.stack([x.float().mean(0) for x in ctx.inputs])
        direction = centroids - centroids.mean(0, keepdim=True)
        tokens = torch.cat([x.float() for x in ctx.inputs])
        logits = tokens @ direction.T
        if logits.abs().max() < 1e-12:  # identical samples: nothing tells the experts apart
            return torch.zeros(ctx.num_experts, ctx.hidden_size)
        goal = self.target * math.log(ctx.num_experts)
        low, high = 0.0, 1.0
        while mean_entropy(logits * high) > goal and high < 1e12:
            high *= 4
        for _ in range(60):  # entropy falls as the scale grows: bisect on it
            mid = (low + high) / 2
            low, high = (mid, high) if mean_entropy(logits * mid) > goal else (low, mid)
        return direction * high


ROUTER_INITS: dict[str, object] = {"normal": NormalInit(), "zeros": ZerosInit(),
                                   "uniform": UniformInit(), "centroid": CentroidInit()}


def mean_entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


# --- running the mixed model one layer at a time ---------------------------------------------------

@dataclass
class RoutingSamples:
    """Token blocks [n, seq_len] to probe the mixed model with."""

    centroid: Mapping[str, torch.Tensor | None] = field(default_factory=dict)
    """Expert name -> its domain's (training) blocks; None: the union of all (a generalist)."""
    heldout: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Domain name -> held-out blocks, for the routing report."""


class _RouterInput(Exception):
    """Raised from the MoE block's pre-hook: the router's input is all the probe needs then."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class LayerwiseProbe:
    """Hidden states of sample blocks, advanced through the mixed model layer by layer. The layers
    are the MoE architecture's own decoder layers (Mixtral, Qwen2/3-MoE, FlexOlmo), so the router
    sees exactly what it will see in the saved model, pre- or post-norm alike."""

    def __init__(self, moe_config, family, samples: RoutingSamples, expert_names: list[str]):
        # transformers' modeling code is imported only here: a plain mix does not pay for it.
        from btx_core.model.config_fields import decoder_classes

        self.layer_class, rotary_class = decoder_classes(family)
        config = copy.deepcopy(moe_config)
        config._attn_implementation = "sdpa"  # a mask of None means causal for sdpa
        config._experts_implementation = "grouped_mm"  # transformers' default; eager-equal (FACTS)
        self.config = config
        window = getattr(config, "sliding_window", None) or None  # no mask: keep blocks inside the window
        self.names = expert_names
        self.groups = {**{f"centroid:{k}": v[:, :window] for k, v in samples.centroid.items() if v is not None},
                       **{f"heldout:{k}": v[:, :window] for k, v in samples.heldout.items()}}
        self.hidden: dict[str, torch.Tensor] = {}
        self.rotary = rotary_class(config)
        self.report: dict[str, list] = {"entropy": [], "load": [], "by_domain_top1": {}, "by_domain_topk": {}}

    def embed(self, embedding: torch.Tensor) -> None:
        for key, blocks in self.groups.items():
            self.hidden[key] = embedding[blocks.long()].float()

    def _run(self, h: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        return self.layer(h, position_embeddings=self.rotary(h, positions), attention_mask=None,
                          position_ids=positions)

    def router_inputs(self, layer: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Build the layer and return each group's router input [tokens, hidden]."""
        self.layer = _decoder_layer(self.layer_class, self.config, layer, tensors)

        def stop(module, args):
            raise _RouterInput(args[0])

        inputs = {}
        hook = self.layer.mlp.register_forward_pre_hook(stop)
        try:
            with torch.no_grad():
                for key, h in self.hidden.items():
                    try:
                        self._run(h)
                    except _RouterInput as captured:
                        inputs[key] = captured.hidden
        finally:
            hook.remove()
        return {k: v.reshape(-1, v.shape[-1]) for k, v in inputs.items()}

    def centroid_inputs(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        everything = torch.cat([v for k, v in inputs.items() if k.startswith("centroid:")])
        return [inputs.get(f"centroid:{name}", everything) for name in self.names]

    def advance(self, router: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> None:
        """Record the routing of the held-out groups, then run the layer with `router`."""
        k = self.config.num_experts_per_tok
        heldout = {key.split(":", 1)[1]: x for key, x in inputs.items() if key.startswith("heldout:")}
        if heldout:
            logits = torch.cat([x @ router.float().T for x in heldout.values()])
            top = logits.topk(k, dim=-1).indices
            self.report["entropy"].append(mean_entropy(logits))
            self.report["load"].append(_fractions(top, len(self.names)))
            for domain, x in heldout.items():
                chosen = (x @ router.float().T).topk(k, dim=-1).indices
                self.report["by_domain_top1"].setdefault(domain, []).append(_fractions(chosen[:, :1], len(self.names)))
                self.report["by_domain_topk"].setdefault(domain, []).append(_fractions(chosen, len(self.names)))
        with torch.no_grad():
            self.layer.mlp.gate.weight.copy_(router.float())
            for key, h in self.hidden.items():
                self.hidden[key] = self._run(h)
        del self.layer


def _fractions(chosen: torch.Tensor, num_experts: int) -> list[float]:
    counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
    return (counts / counts.sum().clamp(min=1)).tolist()


def _decoder_layer(layer_class, config, layer: int, tensors: Mapping[str, torch.Tensor]):
    """A fp32 decoder layer of the MoE holding `tensors` (in-memory names, relative to the layer)."""
    with torch.device("meta"):
        module = layer_class(config, layer)
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True, strict=True)
    return module.eval()


def in_memory_layer(shared: Mapping[str, torch.Tensor], experts: list[Mapping[str, torch.Tensor]],
                    router: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's tensors under transformers' in-memory MoE names (every target alike): gate_proj and up_proj
    fused as `gate_up_proj` [E, 2F, H], `down_proj` [E, H, F] (FACTS: the on-disk layout is
    converted by from_pretrained; load_state_dict needs these)."""
    return {**shared, "mlp.gate.weight": router,
            "mlp.experts.gate_up_proj": torch.stack([torch.cat([e["gate_proj"], e["up_proj"]]) for e in experts]),
            "mlp.experts.down_proj": torch.stack([e["down_proj"] for e in experts])}
