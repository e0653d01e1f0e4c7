"""Do two causal LMs compute the same function? A check that cannot flip with the CPU.

A fixed absolute bound in fp32 did flip: SmolLM2-135M upcycled x3 differed from the dense model by
1.66e-4 on an AVX-512 Xeon and by less elsewhere, because the MoE path (grouped expert matmuls, top-k
weights that sum to 1) accumulates in another order than the dense path, with kernels chosen by the
CPU's vector width. So both models run in float64 here, where that matmul round-off is ~1e-15 and
no longer matters, and the bound is relative to the logits' scale.

What float64 cannot remove: every transformers MoE router takes its softmax in fp32
(`softmax(router_logits.float())`), so the top-k weights, renormalised to sum to 1, sum to 1 only
within (k + 1) fp32 round-offs whatever the CPU (each weight is one correctly rounded division of
the renormalisation). Each MoE layer then returns the dense FFN's output times (1 + e), |e| <= 3u
for top-2, u = 2^-24, and the logits move by that relative perturbation carried through the
later layers. Hence

    bound = HEADROOM * u * max(1, max |logit|),     u = 2^-24 (fp32's unit round-off)

Measured (float64, 300-320 tokens): pico models of every family and RoPE type <= 1.0 u x scale;
SmolLM2-135M (30 layers, logits up to 42) upcycled x4, 7.5 u x scale = 1.9e-5. HEADROOM = 2^7
leaves 17x above the worst. The failures these tests exist for are far larger: a RoPE theta off
by 10 % moved the real model's logits by 1.36 (4,000x the bound there), a pico model's by ~1e-2
(tests/unit/test_families.py measures it), and a missing or re-initialised tensor by as much.

Expert layers run with transformers' `eager` experts: `grouped_mm` has no float64 kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

U32 = torch.finfo(torch.float32).eps / 2  # fp32 unit round-off, 2^-24: the routers' softmax
HEADROOM = 2**7


@dataclass(frozen=True)
class Gap:
    """The largest |logit difference| of two models on the same tokens, and the bound it must meet."""

    diff: float
    scale: float  # max |logit| of the reference model

    @property
    def bound(self) -> float:
        return HEADROOM * U32 * max(1.0, self.scale)

    @property
    def same(self) -> bool:
        return self.diff <= self.bound

    def __str__(self) -> str:
        return (f"max |logit diff| {self.diff:.3g} (float64) against a bound of {self.bound:.3g} "
                f"= 2^7 x 2^-24 x max(1, max |logit| {self.scale:.3g})")


def float64(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in float64 and eval mode, its experts (if any) on the eager path."""
    model = model.to(torch.float64).eval()
    if getattr(model, "_can_set_experts_implementation", lambda: False)():
        model.set_experts_implementation("eager")
    return model


def load_float64(path: Path | str, **kwargs) -> torch.nn.Module:
    """A checkpoint loaded as transformers loads it, in float64 with eager experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **kwargs)
    extra = {"experts_implementation": "eager"} if _is_moe(config) else {}
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float64, **extra).eval()


def logit_gap(model: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor) -> Gap:
    """Both models in float64 on `ids`: their largest logit difference and the reference's scale."""
    with torch.no_grad():
        ours = float64(model)(ids).logits
        theirs = float64(reference)(ids).logits
    return Gap((ours - theirs).abs().max().item(), theirs.abs().max().item())


def _is_moe(config) -> bool:
    return any(getattr(config, key, None) for key in ("num_local_experts", "num_experts"))
