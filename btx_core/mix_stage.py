"""The MiX stage of a pipeline run, and sparse upcycling: experts (or seed copies) from the store
-> one MoE in the store, with its manifest and lineage. Idempotent like every stage."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from btx_core import layout
from btx_core.config import BTXConfig, DataSource, parse_bytes, stable_hash
from btx_core.data.cache import SPLIT_SALT, ensure_prepared, tokenizer_id
from btx_core.data.packing import prepare_domain_data
from btx_core.errors import BTXError, IncompleteOutputError
from btx_core.mix import Expert, MixOptions, mix
from btx_core.routing import RoutingSamples
from btx_core.seed import load_tokenizer
from btx_core.stages import STAGE_FORMAT, StageOutput, cache_dir, open_store
from btx_core.store import MANIFEST, Manifest, Store

log = logging.getLogger(__name__)
GENERALIST = "seed"


def options_from_config(config: BTXConfig, *, upcycle: bool = False) -> MixOptions:
    m = config.mix
    exclude = (GENERALIST,) if m.include_seed and not m.seed_in_shared_mean and not upcycle else ()
    return MixOptions(top_k=m.top_k, shared_policy="mean" if upcycle else m.shared_policy,
                      weights=m.weights, copy_from=None if upcycle else m.copy_from,
                      shared_exclude=exclude, router_init=m.router_init,
                      router_seed=config.expert_training.seed, load_balancing_alpha=m.load_balancing_alpha,
                      shard_size=parse_bytes(m.shard_size))


def mix_stage(config: BTXConfig, *, upcycle: bool = False) -> StageOutput:
    """BTX's MiX of the run's trained experts (plus the seed as a generalist when
    `mix.include_seed`); with `upcycle`, sparse upcycling: as many copies of the seed instead."""
    store, cache = open_store(config), cache_dir(config)
    seed_location = layout.seed_model(config)
    seed = _complete(store, seed_location, "the seed", "btx seed CONFIG")
    domains = [d.name for d in config.domains]
    if upcycle:
        count = len(domains) + config.mix.include_seed
        sources = [(f"copy{i}", seed_location, seed) for i in range(count)]
        centroid_domains = [*domains, None][:count]
    else:
        sources = [(d, layout.expert_model(config, d),
                    _complete(store, layout.expert_model(config, d), f"expert {d}",
                              f"btx train-expert CONFIG --domain {d}")) for d in domains]
        if config.mix.include_seed:
            sources.append((GENERALIST, seed_location, seed))
        centroid_domains = [*domains, None]
    stage = "upcycle" if upcycle else "mix"
    location = layout.upcycle_model(config) if upcycle else layout.mix_model(config)
    data = {d: _prepared(config, store, d, seed_location, seed) for d in domains}
    inputs = {**{f"expert:{name}": m.hash for name, _, m in sources},
              **{f"data:{d}": p.content_id for d, p in data.items()}}
    config_hash = stable_hash({"stage": stage, "format": STAGE_FORMAT, "names": [s[0] for s in sources],
                               "mix": config.mix.model_dump(mode="json"),
                               "seq_len": config.expert_training.seq_len, "seed": config.expert_training.seed})
    if (done := store.exists_with(location, config_hash, inputs)) is not None:
        return StageOutput(location, done, skipped=True)

    local = {loc: store.fetch(loc, cache) for loc in dict.fromkeys(loc for _, loc, _ in sources)}
    experts = [Expert(name, local[loc], loc, m.hash,
                      seed.hash if loc == seed_location else m.inputs.get("seed"))
               for name, loc, m in sources]
    splits = {d: p.load(store, cache) for d, p in data.items()}
    n = config.mix.sample_blocks
    samples = RoutingSamples(
        centroid={name: None if d is None else sample_blocks(splits[d].train, n, config.expert_training.seed)
                  for (name, _, _), d in zip(sources, centroid_domains)},
        heldout={d: sample_blocks(s.heldout, n, config.expert_training.seed) for d, s in splits.items()})
    started = time.perf_counter()
    with store.staging_dir(location, cache) as tmp:
        result = mix(experts, options_from_config(config, upcycle=upcycle), tmp, samples=samples,
                     card={"title": f"{config.run_name}: {'sparse upcycling' if upcycle else 'BTX'} MoE"})
        metrics = {"routing": result.routing, "experts": [e.name for e in experts],
                   "wall_s": time.perf_counter() - started}
        manifest = store.write_dir(tmp, location, stage=stage, config_hash=config_hash, inputs=inputs,
                                   metrics=metrics, known=result.files, move=True)
    return StageOutput(location, manifest, skipped=False, notes=routing_notes(result.routing))


def _complete(store: Store, location: str, what: str, command: str) -> Manifest:
    try:
        return store.read_manifest(location)
    except IncompleteOutputError:
        raise BTXError(f"{what} is not complete at {location}: run `{command}` first") from None


def _prepared(config: BTXConfig, store: Store, domain: str, seed_location: str, seed: Manifest):
    """The domain's packed blocks, exactly as its expert was trained and evaluated on them."""
    settings, spec = config.expert_training, config.domain(domain)
    return ensure_prepared(config, store, spec.data, tokenizer=tokenizer_id(seed),
                           tokenizer_dir=lambda: store.fetch(seed_location, cache_dir(config)),
                           seq_len=settings.seq_len, held_out_fraction=spec.held_out_fraction,
                           cache_dir=cache_dir(config))


def sample_blocks(blocks: np.ndarray, count: int, seed: int) -> torch.Tensor:
    """`count` blocks drawn without replacement (fixed by `seed`), in their original order."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(blocks), size=min(count, len(blocks)), replace=False))
    return torch.from_numpy(np.asarray(blocks[chosen], dtype=np.int64))


def samples_from_paths(experts: list[Expert], paths: list[str], *, seq_len: int, count: int,
                       seed: int = 0) -> RoutingSamples:
    """Routing samples for experts trained anywhere: one text source per expert (flag order),
    tokenized with the first expert's tokenizer and split as btx splits every domain."""
    if len(paths) != len(experts):
        raise BTXError(f"give one --data per expert ({len(experts)} experts, {len(paths)} --data)")
    tokenizer = load_tokenizer(str(experts[0].path))
    centroid, heldout = {}, {}
    for expert, path in zip(experts, paths):
        if path in ("-", "all"):  # a generalist: routed on everyone's text
            centroid[expert.name] = None
            continue
        splits = prepare_domain_data(DataSource(path=str(Path(path).expanduser())), tokenizer, seq_len,
                                     0.05, SPLIT_SALT)
        centroid[expert.name] = sample_blocks(splits.train, count, seed)
        heldout[expert.name] = sample_blocks(splits.heldout, count, seed)
    return RoutingSamples(centroid=centroid, heldout=heldout)


def routing_notes(routing: dict) -> list[str]:
    if not routing:
        return []
    worst = max(max(load) for load in routing["load"])
    entropy = ", ".join(f"{h:.2f}" for h in routing["entropy"])
    return [f"router init {routing['init']}: per-layer routing entropy at init [{entropy}] nats "
            f"(uniform {np.log(len(routing['experts'])):.2f}); busiest expert gets {worst:.0%} of assignments"]


# --- experts trained anywhere: directories in, a directory (or store location) out ----------------

def _output_store(out: str) -> tuple[Store, str]:
    """The store holding `out` (its parent) and `out` as a location; refuses to replace a
    directory that is not a btx output, so a mistyped --out never deletes someone's files."""
    parent = out.rstrip("/").rsplit("/", 1)[0] if "://" in out else str(Path(out).expanduser().resolve().parent)
    location = out if "://" in out else str(Path(out).expanduser().resolve())
    store = Store(parent)
    if store.fs.exists(location) and store.fs.ls(location) and not store.is_complete(location):
        raise BTXError(f"{out} exists and is not a complete btx output: choose another --out, or "
                       "delete it first")
    return store, location


def _commit(out: str, *, stage: str, config_hash: str, inputs: dict[str, str], build) -> StageOutput:
    store, location = _output_store(out)
    if (done := store.exists_with(location, config_hash, inputs)) is not None:
        return StageOutput(location, done, skipped=True)
    started = time.perf_counter()
    with store.staging_dir(location, Path.home() / ".cache" / "btx") as tmp:
        files, metrics, notes = build(tmp)
        manifest = store.write_dir(tmp, location, stage=stage, config_hash=config_hash, inputs=inputs,
                                   metrics={**metrics, "wall_s": time.perf_counter() - started},
                                   known=files, move=True)
    return StageOutput(location, manifest, skipped=False, notes=notes)


def mix_dirs(experts: list[Expert], out: str, options: MixOptions, *, samples: RoutingSamples | None = None,
             stage: str = "mix") -> StageOutput:
    """`btx mix --expert DIR ...` / `btx upcycle --model DIR`: mix local experts into `out`."""
    inputs = {f"expert:{e.name}": e.manifest_hash or _dir_id(e.path) for e in experts}
    config_hash = stable_hash({"stage": stage, "format": STAGE_FORMAT, "options": options,
                               "names": [e.name for e in experts],
                               "samples": samples and {k: None if v is None else v.tolist()
                                                       for k, v in {**samples.centroid, **samples.heldout}.items()}})

    def build(tmp: Path):
        result = mix(experts, options, tmp, samples=samples)
        return result.files, {"routing": result.routing, "experts": [e.name for e in experts]}, \
            routing_notes(result.routing)

    return _commit(out, stage=stage, config_hash=config_hash, inputs=inputs, build=build)


def drop_expert_dir(source: str, expert: str, out: str, *, shard_size: int = 2 * 10**9) -> StageOutput:
    """`btx moe drop-expert`: a copy of the MoE at `source` without `expert`."""
    from btx_core.moe_edit import drop_expert

    path = Path(source).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise BTXError(f"{source} is not a model directory (no config.json)")
    inputs = {"moe": _dir_id(path)}
    config_hash = stable_hash({"stage": "drop-expert", "format": STAGE_FORMAT, "expert": expert})

    def build(tmp: Path):
        config, files = drop_expert(path, expert, tmp, shard_size=shard_size)
        return files, {"experts": config["btx_expert_names"], "dropped": expert}, \
            [f"experts now: {', '.join(config['btx_expert_names'])} (top-{config['num_experts_per_tok']})"]

    return _commit(out, stage="drop-expert", config_hash=config_hash, inputs=inputs, build=build)


def _dir_id(path: Path) -> str:
    """A directory's identity: its btx manifest's hash, else its files' names, sizes and mtimes."""
    if (path / MANIFEST).is_file():
        return Manifest.from_json((path / MANIFEST).read_bytes()).hash
    return stable_hash(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                              for p in path.iterdir() if p.is_file()))
