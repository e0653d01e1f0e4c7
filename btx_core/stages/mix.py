"""The MiX stage of a pipeline run, and sparse upcycling: experts (or seed copies) from the store
-> one MoE in the store, with its manifest and lineage. Idempotent like every stage."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from btx_core.config.schema import BTXConfig, parse_bytes, stable_hash
from btx_core.data.cache import ensure_prepared, tokenizer_id
from btx_core.evaluation import merge_cost
from btx_core.model.card import append_section, recipe_markdown
from btx_core.moe.mix import Expert, MixOptions, mix
from btx_core.moe.router_init import RoutingSamples
from btx_core.stages.common import cache_dir, complete_input, open_store, unless_done
from btx_core.stages.lineage import lineage, recipe
from btx_core.stages.mix_dirs import routing_notes, sample_blocks
from btx_core.store import layout
from btx_core.store.core import Manifest, Store
from btx_core.store.lease import WriterLease
from btx_core.store.outputs import STAGE_FORMAT, StageOutput

log = logging.getLogger(__name__)
GENERALIST = "seed"


def options_from_config(config: BTXConfig, *, upcycle: bool = False) -> MixOptions:
    m = config.mix
    # `seed_in_shared_mean` is about the mean; a weight or a copy_from given for the seed is used as given.
    kept_out = m.include_seed and not m.seed_in_shared_mean and m.shared_policy == "mean"
    exclude = (GENERALIST,) if kept_out and not upcycle else ()
    return MixOptions(top_k=m.top_k, shared_policy="mean" if upcycle else m.shared_policy,
                      weights=m.weights, copy_from=None if upcycle else m.copy_from,
                      shared_exclude=exclude, router_init=m.router_init,
                      router_seed=config.expert_training.seed, load_balancing_alpha=m.load_balancing_alpha,
                      shard_size=parse_bytes(m.shard_size))


def mix_stage(config: BTXConfig, *, upcycle: bool = False, location: str | None = None) -> StageOutput:
    """BTX's MiX of the run's trained experts (plus the seed as a generalist when
    `mix.include_seed`); with `upcycle`, sparse upcycling: as many copies of the seed instead.
    `location` overrides where it is written (`btx ablate`'s MiX lines)."""
    store, cache = open_store(config), cache_dir(config)
    seed_location = layout.seed_model(config.run_root)
    seed = complete_input(store, seed_location, "the seed", "btx seed CONFIG")
    domains = [d.name for d in config.domains]
    if upcycle:
        count = len(domains) + config.mix.include_seed
        sources = [(f"copy{i}", seed_location, seed) for i in range(count)]
        centroid_domains = [*domains, None][:count]
    else:
        sources = [(d, layout.expert_model(config.run_root, d),
                    complete_input(store, layout.expert_model(config.run_root, d), f"expert {d}",
                              f"btx train-expert CONFIG --domain {d}")) for d in domains]
        if config.mix.include_seed:
            sources.append((GENERALIST, seed_location, seed))
        centroid_domains = [*domains, None]
    stage = "upcycle" if upcycle else "mix"
    location = location or (layout.upcycle_model if upcycle else layout.mix_model)(config.run_root)
    data = {d: _prepared(config, store, d, seed_location, seed) for d in domains}
    inputs = {**{f"expert:{name}": m.hash for name, _, m in sources},
              **{f"data:{d}": p.content_id for d, p in data.items()}}
    # Sparse upcycling measures no merge cost: its outputs made before there was one stay valid.
    mix_settings = config.mix.model_dump(mode="json", exclude={"merge_cost_tokens"} if upcycle else None)
    config_hash = stable_hash({"stage": stage, "format": STAGE_FORMAT, "names": [s[0] for s in sources],
                               "mix": mix_settings,
                               "seq_len": config.expert_training.seq_len, "seed": config.expert_training.seed})

    def make(lease: WriterLease | None) -> StageOutput:  # the work, under the stage's writer lease
        local = {loc: store.fetch(loc, cache) for loc in dict.fromkeys(loc for _, loc, _ in sources)}
        experts = [Expert(name, local[loc], loc, m.hash,
                          seed.hash if loc == seed_location else m.inputs.get("seed"))
                   for name, loc, m in sources]
        splits = {d: p.load(store, cache) for d, p in data.items()}
        samples = routing_samples(config, splits, {name: d for (name, _, _), d in zip(sources, centroid_domains)})
        started = time.perf_counter()
        with store.staging_dir(location, cache) as tmp:
            seed_dir = local.get(seed_location)  # the seed's own card (license, base_model), when fetched
            result = mix(experts, options_from_config(config, upcycle=upcycle), tmp, samples=samples,
                         card={"title": f"{config.run_name}: {'sparse upcycling' if upcycle else 'BTX'} MoE",
                               **lineage(config, seed, seed_dir)})
            append_section(tmp, "Recipe", recipe_markdown(recipe(config, store, experts=not upcycle)))
            metrics = {"routing": result.routing, "experts": [e.name for e in experts],
                       "wall_s": time.perf_counter() - started}
            notes = routing_notes(result.routing)
            if not upcycle:  # copies of the seed: a merge that costs nothing by construction
                cost = _merge_cost(config, experts, tmp, store.fetch(seed_location, cache), result.shared_weights,
                                   samples.heldout)
                append_section(tmp, "What the merge cost (btx_core/evaluation/merge_cost.py)",
                               merge_cost.markdown(cost))
                metrics["merge_cost"] = cost
                notes += merge_cost.notes(cost)
            manifest = store.write_dir(tmp, location, stage=stage, config_hash=config_hash, inputs=inputs,
                                       metrics=metrics, known=result.files, move=True, fence=lease)
        return StageOutput(location, manifest, skipped=False, notes=notes)

    return unless_done(store, config, location, config_hash, inputs, make)


def routing_samples(config: BTXConfig, splits: dict, centroid_domains: dict[str, str | None]) -> RoutingSamples:
    """`mix.sample_blocks` blocks per domain: from each expert's training split for the centroid
    init (drawn with the run's random seed), and from each held-out split for the routing report and
    the merge cost (drawn with `compare.eval_seed`, so every random seed of a comparison is measured
    on the same held-out blocks). `centroid_domains`: expert name -> its domain (None: all)."""
    n = config.mix.sample_blocks
    return RoutingSamples(
        centroid={name: None if d is None else sample_blocks(splits[d].train, n, config.expert_training.seed)
                  for name, d in centroid_domains.items()},
        heldout={d: sample_blocks(s.heldout, n, config.compare.eval_seed) for d, s in splits.items()})


def _merge_cost(config: BTXConfig, experts: list[Expert], moe_dir: Path, seed_dir: Path,
                merge_weights: dict[str, float], heldout: dict) -> dict:
    """The merge-cost report of the run's MiX (`btx_core/evaluation/merge_cost.py`), with the
    levers it was made with."""
    m = config.mix
    settings = {"branch.train": config.branch.train, "mix.shared_policy": m.shared_policy,
                "mix.seed_in_shared_mean": m.seed_in_shared_mean, "mix.router_init": m.router_init}
    started = time.perf_counter()
    cost = merge_cost.measure(moe_dir, {e.name: e.path for e in experts}, seed=seed_dir,
                              merge_weights=merge_weights, heldout=heldout, tokens=m.merge_cost_tokens,
                              batch_size=config.compare.batch_size, precision=config.expert_training.precision,
                              settings=settings)
    return {**cost, "wall_s": time.perf_counter() - started}


def _prepared(config: BTXConfig, store: Store, domain: str, seed_location: str, seed: Manifest):
    """The domain's packed blocks, exactly as its expert was trained and evaluated on them."""
    settings, spec = config.expert_training, config.domain(domain)
    return ensure_prepared(store, spec.data, store_root=config.store, tokenizer=tokenizer_id(seed),
                           tokenizer_dir=lambda: store.fetch(seed_location, cache_dir(config)),
                           seq_len=settings.seq_len, held_out_fraction=spec.held_out_fraction,
                           cache_dir=cache_dir(config))


