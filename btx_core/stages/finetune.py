"""The MoE-finetune stage (BTX section 2.4), and the two baselines trained the same way: sparse
upcycling (the MoE of seed copies, finetuned) and the dense baseline (the seed trained further).

All three train on the same mixture (every domain plus the general corpus, weights from the
config) through the expert-training loop (`TrainingRun`: checkpoints, resume, store, manifest);
an MoE adds its routing strategy, the load-balancing loss (by default the paper's, per layer,
computed here from the router logits: `moe/routing.py`) and optionally frozen expert FFNs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from btx_core.config.schema import GENERAL, BTXConfig, FinetuneSettings, TrainSettings, stable_hash
from btx_core.data.cache import PreparedData, ensure_prepared, tokenizer_id
from btx_core.data.prepare import TokenizedSplits
from btx_core.data.shards import BlockMixture, Blocks
from btx_core.errors import BTXError
from btx_core.evaluation import merge_cost
from btx_core.model.dense import load_causal_lm
from btx_core.moe.routing import RouterObjective, RoutingPlan, configure, freeze_experts
from btx_core.stages.common import ProgressCallback, TrainingRun, cache_dir, complete_input, open_store
from btx_core.stages.lineage import lineage, recipe
from btx_core.store import layout
from btx_core.store.core import Manifest, Store
from btx_core.store.outputs import STAGE_FORMAT, StageOutput
from btx_core.training.distributed import init_distributed, main_rank_first, pick_device

log = logging.getLogger(__name__)

# What each kind of finetuning starts from, and what produces it.
SOURCES = {"btx": (layout.mix_model, "btx mix CONFIG"),
           "upcycle": (layout.upcycle_model, "btx upcycle CONFIG"),
           "dense": (layout.seed_model, "btx seed CONFIG")}


def settings_of(config: BTXConfig) -> FinetuneSettings:
    if config.finetune is None:
        raise BTXError("the config has no `finetune` section: add one (at least "
                       "`finetune: {training: {steps: N}}`) to finetune the MoE")
    return config.finetune


def routing_plan(config: BTXConfig) -> RoutingPlan:
    ft = settings_of(config)
    sampled = ft.routing == "sample_top1"
    return RoutingPlan(strategy=ft.routing, top_k=1 if sampled else ft.top_k or config.mix.top_k,
                       load_balancing=ft.load_balancing,
                       alpha=config.mix.load_balancing_alpha if ft.load_balancing_alpha is None
                       else ft.load_balancing_alpha,
                       loss=ft.load_balancing_loss,
                       temperature=tuple(ft.gumbel_temperature) if sampled else None)


# --- the data mixture ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Mixture:
    """Training blocks drawn from every source in proportion to its weight; held-out blocks
    interleaved source by source (so a prefix of them covers every source)."""

    train: Blocks
    heldout: Blocks
    weights: dict[str, float]


def mixture_weights(config: BTXConfig) -> dict[str, float]:
    """Source -> weight summing to 1; uniform over the domains and `general` by default."""
    names = [d.name for d in config.domains] + [GENERAL]
    raw = settings_of(config).mixture or dict.fromkeys(names, 1.0)
    total = sum(raw.values())
    return {n: raw[n] / total for n in names if raw.get(n, 0) > 0}


def build_mixture(splits: dict[str, TokenizedSplits], weights: dict[str, float], seed: int) -> Mixture:
    """As many training blocks as all sources hold together, each source contributing its weight's
    share: a small source repeats (a fresh permutation per pass), a large one is subsampled. The
    mixture is an index over the sources' blocks, read on demand like the sources themselves."""
    total = sum(len(splits[n].train) for n in weights)
    sources, which, rows = [], [], []
    for i, (name, weight) in enumerate(weights.items()):
        blocks = splits[name].train
        if len(blocks) == 0:
            raise BTXError(f"mixture source {name!r} has no training blocks: give it more text or "
                           "set its weight in finetune.mixture to 0")
        count = max(1, round(weight * total))
        rng = np.random.default_rng([seed, i])
        order = np.concatenate([rng.permutation(len(blocks)) for _ in range(-(-count // len(blocks)))])
        sources.append(blocks)
        which.append(np.full(count, i))
        rows.append(order[:count])
    train = BlockMixture(sources, np.concatenate(which), np.concatenate(rows))
    heldouts = [splits[n].heldout for n in weights if len(splits[n].heldout)]
    depth = min(len(h) for h in heldouts)
    # Interleaved source by source: row j * len(heldouts) + k is block j of source k.
    heldout = BlockMixture(heldouts, np.tile(np.arange(len(heldouts)), depth),
                           np.repeat(np.arange(depth), len(heldouts)))
    return Mixture(train, heldout, weights)


def prepared_sources(config: BTXConfig, store: Store, seed_location: str, seed: Manifest,
                     seq_len: int) -> dict[str, PreparedData]:
    """Each mixture source, tokenized with the seed's tokenizer and packed at `seq_len`."""
    cache = cache_dir(config)
    sources = {d.name: (d.data, d.held_out_fraction) for d in config.domains}
    sources[GENERAL] = (config.seed.pretrain_data, config.seed.held_out_fraction)
    weighted = mixture_weights(config)
    return {name: ensure_prepared(store, source, store_root=config.store, tokenizer=tokenizer_id(seed),
                                  tokenizer_dir=lambda: store.fetch(seed_location, cache),
                                  seq_len=seq_len, held_out_fraction=fraction, cache_dir=cache)
            for name, (source, fraction) in sources.items() if name in weighted}


# --- the stage -----------------------------------------------------------------------------------

def card_facts(config: BTXConfig, store: Store, kind: str, seed: Manifest, model_dir, source: Manifest) -> dict:
    """What the finetuned model's card says beyond its own training: the seed's lineage (the
    dense baseline's source is the seed itself, whose card may name a base_model), the stages
    before (the experts: BTX only), the peak lr, and what BTX's merge cost."""
    cost = source.metrics.get("merge_cost") if kind == "btx" else None
    return {"lineage": lineage(config, seed, model_dir if kind == "dense" else None),
            "recipe": recipe(config, store, experts=kind == "btx"), "lr": settings_of(config).training.lr,
            "sections": {"What the merge cost, before finetuning": merge_cost.markdown(cost)} if cost else {}}


def finetune(config: BTXConfig, kind: str = "btx", *, steps: int | None = None, name: str | None = None,
             on_progress: ProgressCallback | None = None, stop_after: int | None = None,
             source: str | None = None) -> StageOutput:
    """Finetune the run's MiX output (`btx`), its upcycled seed (`upcycle`) or the seed itself
    (`dense`) on the mixture; `steps` overrides the budget (compute matching), `name` the output
    (`<run>/trained/<name>/model`), `source` the model of that kind to start from (`btx ablate`).
    Resumes from its checkpoints; skips when already done."""
    ft = settings_of(config)
    if kind not in SOURCES:
        raise BTXError(f"unknown finetune kind {kind!r}; known: {', '.join(SOURCES)}")
    settings: TrainSettings = ft.training if steps is None else ft.training.model_copy(
        update={"steps": steps, "tokens": None})
    name = name or kind
    store, cache = open_store(config), cache_dir(config)
    where, command = SOURCES[kind]
    source = source or where(config.run_root)
    source_manifest = complete_input(store, source, f"the {kind} source model", command)
    seed_location = layout.seed_model(config.run_root)
    seed = complete_input(store, seed_location, "the seed", "btx seed CONFIG")
    ranks = init_distributed(settings.device)
    with main_rank_first(ranks):  # rank 0 tokenizes into the shared cache
        prepared = prepared_sources(config, store, seed_location, seed, settings.seq_len)
    weights = mixture_weights(config)
    plan = routing_plan(config) if kind != "dense" else None
    frozen = ft.freeze_experts and plan is not None
    warmup = ft.router_warmup_steps if plan is not None else 0
    router_lr = ft.router_lr if plan is not None else None
    # The warm-up and router lr enter only when set: finetunes made before they existed stay valid.
    config_hash = stable_hash({"stage": "finetune", "format": STAGE_FORMAT, "kind": kind,
                               "training": settings.result_hash(), "mixture": weights,
                               "routing": plan and asdict(plan), "freeze_experts": frozen,
                               **({"router_warmup_steps": warmup} if warmup else {}),
                               **({"router_lr": router_lr} if router_lr is not None else {})})
    inputs = {"model": source_manifest.hash, **{f"data:{n}": p.content_id for n, p in prepared.items()}}
    location = layout.trained_model(config.run_root, name)
    if (done := store.exists_with(location, config_hash, inputs)) is not None:
        return StageOutput(location, done, skipped=True)

    with main_rank_first(ranks):
        model_dir = store.fetch(source, cache)
        splits = {n: p.load(store, cache) for n, p in prepared.items()}
    model, tokenizer = load_causal_lm(str(model_dir), allow_moe=True,
                                      trust_remote_code=config.seed.trust_remote_code)
    metrics: dict = {"kind": kind, "mixture": weights, "source": source}
    objective = None
    if plan is not None:
        configure(model, plan)
        objective = RouterObjective(model, plan, seed=settings.seed, router_warmup_steps=warmup,
                                    router_lr=router_lr)
        metrics.update(routing=asdict(plan), frozen_parameters=freeze_experts(model) if frozen else 0,
                       router_warmup_steps=warmup, router_lr=router_lr or settings.lr)
    model.to(pick_device(settings.device, ranks, settings.precision))
    data = build_mixture(splits, weights, settings.seed)
    run = TrainingRun(store, config, settings, ranks, location=location,
                      checkpoints=layout.trained_checkpoints(config.run_root, name), stage="finetune",
                      config_hash=config_hash, inputs=inputs, card_source=(source, model_dir),
                      card_facts=card_facts(config, store, kind, seed, model_dir, source_manifest))
    metrics.update(start_heldout_loss=run.heldout_loss(model, data),
                   trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    log.info("finetune %s (%s): %d steps from %s", name, kind, settings.total_steps(ranks.world_size), source)
    return run.train_and_save(model, tokenizer, data, metrics=metrics, on_progress=on_progress,
                              stop_after=stop_after, objective=objective)

