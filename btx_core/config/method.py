"""The settings of the method's own steps: what an expert trains (Branch), how the experts are
mixed (MiX), and how `btx compare` evaluates. The training recipe of each stage (`TrainSettings`)
and MoE-finetuning live in `schema.py`, which assembles the whole config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from btx_core.config.base import StrictModel
from btx_core.config.values import parse_bytes


class BranchSettings(StrictModel):
    """What each expert trains of its copy of the seed (Branch + Train, BTX section 2.1)."""

    train: Literal["all", "ffn", "ffn_and_norms"] = "all"
    """`all` (the paper): every weight trains, and MiX averages the experts' non-FFN weights.
    `ffn`: only the FFNs train, every other weight stays the seed's (frozen, out of the optimizer,
    as FlexOlmo trains its experts), so the mixed model's shared weights are the seed's and MiX
    loses nothing: routed to an expert alone, the MoE computes that expert. `ffn_and_norms`: the
    FFNs and the RMSNorm gains train (a cheap per-layer rescaling for each expert); the norms are
    then merged like any shared tensor, and only they differ from the seed's."""


class MixSettings(StrictModel):
    """MiX: dense experts -> one Mixtral (BTX section 2.3). Paper defaults: the seed joins as a
    generalist expert, top-2 routing, load balancing with alpha = 0.01 per layer."""

    include_seed: bool = True
    """Add the seed as an extra "generalist" expert (the paper mixes 3 domain experts + the seed)."""
    seed_in_shared_mean: bool = False
    """Whether the seed's non-FFN tensors join the `mean` policy's mean (a pilot found the mean
    over the domain experts alone slightly better after finetuning). The `mean` policy only:
    `weighted` uses the seed's weight in `weights`, `copy` may copy from the seed."""
    shared_policy: Literal["mean", "weighted", "copy"] = "mean"
    """How non-FFN tensors (attention, embeddings, norms, lm_head) are merged."""
    weights: dict[str, float] | None = None
    """`weighted` policy: expert name -> weight, one for every expert (the seed too when
    `include_seed`; 0 leaves an expert out), normalised to sum 1."""
    copy_from: str | None = None
    """`copy` policy: the expert whose non-FFN tensors are copied (`seed`: the seed's own, as
    mergekit-moe does; with `branch.train: ffn` every expert's are the seed's anyway)."""
    router_init: Literal["normal", "zeros", "uniform", "centroid"] = "centroid"
    """New routers: `centroid` (each expert's mean router input on its domain; the default, from
    RESULTS.md's measurements: better BTX in every run that compared it), `normal` (std = the
    model's initializer_range, what transformers gives a new Mixtral), `zeros` (uniform routing),
    `uniform` (nn.Linear's default)."""
    top_k: int = Field(default=2, ge=1)
    """Experts per token."""
    load_balancing_alpha: float = Field(default=0.01, ge=0)
    """The paper's load-balancing coefficient per layer (finetuning's `load_balancing_loss`);
    the saved config's `router_aux_loss_coef` is alpha x num_layers, transformers' own loss
    being averaged over layers where the paper sums it."""
    sample_blocks: int = Field(default=32, gt=0)
    """Blocks per domain for the centroid init (training blocks, drawn with the run's random seed)
    and the routing report and merge cost (held-out blocks, drawn with `compare.eval_seed`)."""
    merge_cost_tokens: int = Field(default=512, ge=0)
    """Held-out tokens per domain (whole blocks: at least one, at most `sample_blocks`) on which
    the merge-cost report measures each domain's loss through the mixed model routed to its own
    expert only (the oracle), next to the expert alone and the mixed model as routed; 0: weight
    distances only."""
    shard_size: str = "2GB"
    """Largest output shard, e.g. `2GB`, `500MB`."""

    @field_validator("shard_size")
    @classmethod
    def _byte_size(cls, value: str) -> str:
        parse_bytes(value)
        return value


class CompareSettings(StrictModel):
    """`btx compare`: BTX against its baselines at matched compute (BTX paper, Table 2)."""

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Random seeds; each is a full branch-train-mix-finetune plus baselines from the same seed
    model (expert data order, router init, finetune data order change with it)."""
    eval_blocks: int = Field(default=64, gt=0)
    """Held-out blocks per domain in the single-domain evaluation set, drawn at random from all of
    the domain's held-out blocks (all of them when it has fewer)."""
    mixed_blocks: int = Field(default=64, gt=0)
    """Blocks in the mixed-domain set, each spliced from 2-3 domains' held-out text."""
    eval_seed: int = 20240311
    """Fixes which held-out blocks both evaluation sets draw: the same for every model and every
    random seed of a comparison (recorded in results.json under `eval_sets`)."""
    btm_top_k: list[int] = Field(default_factory=lambda: [1, 2])
    """Branch-Train-Merge ensembles to evaluate: top-k experts by domain posterior."""
    batch_size: int = Field(default=8, gt=0)
    """Blocks per evaluation forward pass."""
    seed_below_uniform: float | None = Field(default=None, ge=0)
    """Refuse to branch unless the seed's held-out loss on every domain is at least this many
    nats below ln(vocab_size), a uniform guess's. A seed that knows nothing of its domains (the
    first toy table's, 0.006 nats below on code) makes its experts learn them from scratch and
    rewrite every shared weight: a regime the paper never claimed. None: no check."""
    matchings: list[Literal["tokens", "flops", "time"]] = Field(
        default_factory=lambda: ["tokens", "flops", "time"], min_length=1)
    """How the upcycling and dense baselines are matched to BTX's training: in tokens, in FLOPs,
    in measured device time; each adds an upcycled and a dense finetune per random seed. Leave
    out `time` where BTX's device time is not worth matching (its experts shared a machine with
    other work): its runs are the longest when the expert phase was slow. `time` needs `tokens` or
    `flops`, whose measured seconds per step size it."""

    @field_validator("matchings")
    @classmethod
    def _matchings(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: name each matching once")
        if "time" in value and not {"tokens", "flops"} & set(value):
            raise ValueError("`time` sizes its runs by the seconds per step that the token- or FLOP-matched "
                             "runs measure: add `tokens` or `flops` to compare.matchings")
        return value
