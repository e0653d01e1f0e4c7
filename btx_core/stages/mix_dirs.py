"""MiX for experts trained anywhere: local (or store) directories in, a directory or store
location out, with the same manifest and lineage as a pipeline stage. What `btx mix --expert`,
`btx upcycle --model` and `btx moe drop-expert` run; it imports no training code."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from btx_core.config.schema import DataSource, stable_hash
from btx_core.errors import BTXError
from btx_core.evaluation import merge_cost
from btx_core.model.card import append_section
from btx_core.moe.mix import Expert, MixOptions, mix
from btx_core.moe.router_init import RoutingSamples
from btx_core.store.core import MANIFEST, Manifest, Store
from btx_core.store.outputs import STAGE_FORMAT, StageOutput


def experts_from_dirs(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Expert]:
    """Experts from local directories (flag order); names default to the directory names. A btx
    manifest in a directory is verified (every file's sha256) and recorded in the lineage."""
    names = list(names or [])
    dirs = [Path(p).expanduser().resolve() for p in paths]
    default = [d.name if d.name != "model" else d.parent.name for d in dirs]
    if len(set(default)) < len(default):
        default = [f"expert{i}" for i in range(len(dirs))]
    experts = []
    for i, d in enumerate(dirs):
        manifest_hash = seed_hash = None
        if (d / MANIFEST).is_file():
            manifest = Manifest.from_json((d / MANIFEST).read_bytes())
            Store(str(d.parent)).verify(str(d))
            manifest_hash, seed_hash = manifest.hash, manifest.inputs.get("seed")
        experts.append(Expert(names[i] if i < len(names) else default[i], d, str(d), manifest_hash, seed_hash))
    return experts


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
    import tempfile

    from btx_core.data.cache import SPLIT_SALT
    from btx_core.data.prepare import prepare_domain_data
    from btx_core.model.dense import load_tokenizer

    tokenizer = load_tokenizer(str(experts[0].path))
    centroid, heldout = {}, {}
    for expert, path in zip(experts, paths):
        if path in ("-", "all"):  # a generalist: routed on everyone's text
            centroid[expert.name] = None
            continue
        with tempfile.TemporaryDirectory(prefix="btx-routing-data-") as tmp:
            splits = prepare_domain_data(DataSource(path=str(Path(path).expanduser())), tokenizer, seq_len,
                                         0.05, SPLIT_SALT, Path(tmp) / "data", cache_dir=tmp)
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
             stage: str = "mix", base: Path | None = None, merge_cost_tokens: int = 512) -> StageOutput:
    """`btx mix --expert DIR ...` / `btx upcycle --model DIR`: mix local experts into `out`. A mix
    measures what it cost: weight distances from `base` (the seed the experts were branched from)
    when given, and the oracle-routed losses on `samples.heldout` (keyed by expert name)."""
    inputs = {f"expert:{e.name}": e.manifest_hash or _dir_id(e.path) for e in experts}
    if base is not None:
        inputs["base"] = _dir_id(Path(base))
    config_hash = stable_hash({"stage": stage, "format": STAGE_FORMAT, "options": options,
                               "names": [e.name for e in experts], "merge_cost_tokens": merge_cost_tokens,
                               "samples": samples and {k: None if v is None else v.tolist()
                                                       for k, v in {**samples.centroid, **samples.heldout}.items()}})

    def build(tmp: Path):
        result = mix(experts, options, tmp, samples=samples)
        metrics, notes = {"routing": result.routing, "experts": [e.name for e in experts]}, routing_notes(result.routing)
        if stage == "mix":
            cost = merge_cost.measure(tmp, {e.name: e.path for e in experts}, seed=base,
                                      merge_weights=result.shared_weights, heldout=samples.heldout if samples else {},
                                      tokens=merge_cost_tokens, settings={"shared_policy": options.shared_policy,
                                                                          "router_init": options.router_init})
            append_section(tmp, "What the merge cost (btx_core/evaluation/merge_cost.py)", merge_cost.markdown(cost))
            metrics["merge_cost"], notes = cost, notes + merge_cost.notes(cost)
        return result.files, metrics, notes

    return _commit(out, stage=stage, config_hash=config_hash, inputs=inputs, build=build)


def drop_expert_dir(source: str, expert: str, out: str, *, shard_size: int = 2 * 10**9) -> StageOutput:
    """`btx moe drop-expert`: a copy of the MoE at `source` without `expert`."""
    from btx_core.moe.edit import drop_expert

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
