"""The training loop's optimizer: AdamW over parameter groups (weight decay or not; a parameter's
own peak learning rate, such as MoE finetuning's router lr)."""

from __future__ import annotations

import torch

from btx_core.config.schema import TrainSettings


def adamw(model: torch.nn.Module, settings: TrainSettings, fused: bool,
          learning_rates: dict[int, float] | None = None) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-d tensors), as in Llama's and GPT's recipes. The two
    # groups at the run's lr come first, always: a run without own learning rates has exactly them.
    params = [p for p in model.parameters() if p.requires_grad]
    own = learning_rates or {}
    kinds = [(True, settings.weight_decay), (False, 0.0)]
    groups = [{"params": [p for p in params if (p.ndim >= 2) == matrix and id(p) not in own],
               "weight_decay": decay} for matrix, decay in kinds]
    for lr in sorted({own[id(p)] for p in params if id(p) in own}):
        for matrix, decay in kinds:
            if chosen := [p for p in params if (p.ndim >= 2) == matrix and own.get(id(p)) == lr]:
                groups.append({"params": chosen, "weight_decay": decay, "lr": lr})
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                             fused=fused or None)
