"""The evaluate stage: held-out losses of any model (a store output or a local directory) on a
run's two held-out sets, and the pipeline's evaluation of the seed, each expert, their BTM
ensembles, the MiX output and BTX, recorded in the store."""

from __future__ import annotations

import dataclasses
import gc
import json
import tempfile
from pathlib import Path

from btx_core.config.schema import BTXConfig, stable_hash
from btx_core.data.cache import ensure_prepared, tokenizer_id
from btx_core.evaluation.scores import EvalSets, ModelScores, btm_scores, build_eval_sets, score_model
from btx_core.model.card import evaluation_markdown, model_index, with_evaluation
from btx_core.model.dense import load_causal_lm
from btx_core.stages.common import cache_dir, open_store, stage_lease, unless_done
from btx_core.store import layout
from btx_core.store.core import Store
from btx_core.store.lease import WriterLease
from btx_core.store.outputs import STAGE_FORMAT, StageOutput


def eval_sets(config: BTXConfig) -> EvalSets:
    """The held-out sets of a run: blocks sampled (seed `compare.eval_seed`) from its domains'
    held-out blocks, packed as the experts were trained; the same for every model of the run."""
    store, cache = open_store(config), cache_dir(config)
    seed_location = layout.seed_model(config.run_root)
    seed = store.read_manifest(seed_location)
    settings = config.expert_training
    heldout, data = {}, {}
    for d in config.domains:
        prepared = ensure_prepared(store, d.data, store_root=config.store, tokenizer=tokenizer_id(seed),
                                   tokenizer_dir=lambda: store.fetch(seed_location, cache),
                                   seq_len=settings.seq_len, held_out_fraction=d.held_out_fraction,
                                   cache_dir=cache)
        heldout[d.name] = prepared.load(store, cache).heldout
        data[d.name] = prepared.content_id
    sets = build_eval_sets(heldout, eval_blocks=config.compare.eval_blocks,
                           mixed_blocks=config.compare.mixed_blocks, seed=config.compare.eval_seed)
    return dataclasses.replace(sets, data=data)


def _model_dir(config: BTXConfig, location: str) -> Path:
    """A local directory of a model: a store output (verified), or a plain local directory."""
    path = Path(location).expanduser()
    if path.is_dir() and not (path / "_manifest.json").exists():
        return path
    return open_store(config).fetch(location, cache_dir(config))


def score_location(config: BTXConfig, location: str, sets: EvalSets) -> ModelScores:
    model, _ = load_causal_lm(str(_model_dir(config, location)), allow_moe=True,
                              trust_remote_code=config.seed.trust_remote_code)
    try:
        return score_model(model, sets, batch_size=config.compare.batch_size,
                           precision=config.expert_training.precision)
    finally:
        del model
        gc.collect()


def evaluate_location(config: BTXConfig, location: str) -> dict:
    """`btx eval`: one model's held-out losses (and routing, for an MoE) on the run's sets."""
    sets = eval_sets(config)
    scores = score_location(config, location, sets)
    return {"model": location, "sets": sets.describe(), **scores.losses(), "routing": scores.routing}


def evaluate_run(config: BTXConfig) -> StageOutput:
    """The pipeline's evaluation stage: the seed, each expert, their BTM ensembles, the MiX output
    and (once finetuned) BTX on both held-out sets; the losses and BTX's routing go into the
    manifest of `<run>/eval/results` (with results.json), and the table into BTX's model card.
    Skipped when nothing changed."""
    store = open_store(config)
    models = {"seed": layout.seed_model(config.run_root),
              **{f"expert:{d.name}": layout.expert_model(config.run_root, d.name) for d in config.domains},
              "btx-mix": layout.mix_model(config.run_root)}
    if store.is_complete(layout.trained_model(config.run_root, "btx")):
        models["btx"] = layout.trained_model(config.run_root, "btx")
    inputs = {name: store.read_manifest(location).hash for name, location in models.items()}
    location = layout.eval_results(config.run_root)
    config_hash = stable_hash({"stage": "eval", "format": STAGE_FORMAT, "include_seed": config.mix.include_seed,
                               "compare": config.compare.model_dump(mode="json", exclude={"seeds"})})
    return unless_done(store, config, location, config_hash, inputs,
                       lambda lease: _evaluate(config, store, models, location, config_hash, inputs, lease))


def card_with_evaluation(config: BTXConfig, store: Store, location: str, results: dict) -> str:
    """Add the held-out table (and the Hub's `model-index`) to the card of the model at
    `location`, under its stage's writer lease; returns the model's new manifest hash."""
    domains = [d.name for d in config.domains]
    text = store.read_file(location, "README.md", store.read_manifest(location)).decode()
    card = with_evaluation(text, model_index(config.run_name, results["btx"], domains),
                           evaluation_markdown(results, domains, "btx"))
    with stage_lease(store, config, location) as lease:
        return store.amend(location, {"README.md": card.encode()}, fence=lease).hash


def _evaluate(config: BTXConfig, store: Store, models: dict[str, str], location: str, config_hash: str,
              inputs: dict[str, str], lease: WriterLease | None) -> StageOutput:
    sets = eval_sets(config)
    scores = {name: score_location(config, loc, sets) for name, loc in models.items()}
    results = {name: s.losses() for name, s in scores.items()}
    ensemble = [scores[f"expert:{d.name}"] for d in config.domains] + [scores["seed"]] * config.mix.include_seed
    results.update({f"btm-top{k}": btm_scores(ensemble, k).losses() for k in config.compare.btm_top_k})
    routing = {name: s.routing for name, s in scores.items() if s.routing}
    # What the merge cost (measured by the MiX stage: btx_core/evaluation/merge_cost.py), beside the losses.
    merge = store.read_manifest(models["btx-mix"]).metrics.get("merge_cost")
    if "btx" in models:  # the finetuned model's card gains the table; its new manifest is this stage's input
        inputs = {**inputs, "btx": card_with_evaluation(config, store, models["btx"], results)}
    with tempfile.TemporaryDirectory(prefix="btx-eval-") as tmp:
        (Path(tmp) / "results.json").write_text(json.dumps({"losses": results, "routing": routing,
                                                            "merge_cost": merge, "sets": sets.describe()}, indent=1))
        manifest = store.write_dir(Path(tmp), location, stage="eval", config_hash=config_hash, inputs=inputs,
                                   metrics={"losses": results, "routing": routing, "merge_cost": merge}, fence=lease)
    return StageOutput(location, manifest, skipped=False)
