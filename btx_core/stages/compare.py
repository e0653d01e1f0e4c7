"""`btx compare`: BTX against its baselines from the same code paths, at matched compute, over
several random seeds (the BTX paper's Table 2, small).

Per random seed: seed -> experts -> MiX -> MoE-finetune (BTX); sparse upcycling and the dense
baseline finetuned on the same mixture with budgets matched to BTX's training after the seed three
ways (those `compare.matchings` names): in tokens, in FLOPs, and in measured device time (each
stage's wall time x devices, the paper's GPU-days); the BTM ensemble of the experts; all evaluated
on the same held-out sets.

Device time is matched from measurements of the same run: BTX's is its experts' and its
finetuning's; a baseline's seconds per step come from its token- and FLOP-matched runs (same model,
recipe and machine), and its time-matched run gets BTX's device time divided by that. On a shared
machine wall times are noisy, so each time-matched row reports the device time it really took.
Stages run one after another here; experts trained concurrently on shared cores (the Prefect flow)
would each measure the contention too. Every stage is a store output, so a rerun (or a run after `btx run`) reuses what exists.
The seed model is shared by all random seeds, as in the paper (a given pretrained LLM); a seed
other than the config's own runs as `<run_name>-seed<r>`, which imports that seed model.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from btx_core.config.schema import BTXConfig, SeedSpec, stable_hash
from btx_core.errors import BTXError
from btx_core.evaluation import merge_cost
from btx_core.evaluation.plots import routing_heatmap
from btx_core.evaluation.report import (
    aggregate,
    claims,
    claims_markdown,
    markdown_table,
    mixed_table,
    routing_csv,
    routing_layers_markdown,
)
from btx_core.evaluation.scores import EvalSets, ModelScores, btm_scores
from btx_core.stages.common import cache_dir, open_store, stage_lease, unless_done
from btx_core.stages.evaluate import eval_sets, score_location
from btx_core.stages.expert import train_expert
from btx_core.stages.finetune import finetune, settings_of
from btx_core.stages.mix import mix_stage
from btx_core.stages.seed import build_seed
from btx_core.store import layout
from btx_core.store.core import Store
from btx_core.store.outputs import STAGE_FORMAT, StageOutput
from btx_core.training.compute import (
    StageCompute,
    device_seconds,
    ffn_fraction,
    flops_per_token,
    matched_budgets,
    time_matched,
)

log = logging.getLogger(__name__)
BASELINES = ("upcycle-tokens", "upcycle-flops", "upcycle-time", "dense-tokens", "dense-flops", "dense-time")
# Trained first: their measured seconds per step size the time-matched runs.
MEASURED = ("upcycle-tokens", "upcycle-flops", "dense-tokens", "dense-flops")
StageCallback = Callable[[str], None]
# What a model's recorded scores depend on in `compare` (beside its manifest and the held-out sets).
SCORING_SETTINGS = {"eval_blocks", "mixed_blocks", "eval_seed", "batch_size", "btm_top_k"}


class SeedTooWeakError(BTXError):
    """The seed does not meet `compare.seed_below_uniform` on some domain."""


def seed_config(config: BTXConfig, seed: int) -> BTXConfig:
    """The run of one random seed: the config itself for its own seed; otherwise the same run
    under `<run_name>-seed<r>`, branching from the config's (shared) seed model."""
    if seed == config.expert_training.seed:
        return config
    shared = SeedSpec(model=layout.seed_model(config.run_root),
                      trust_remote_code=config.seed.trust_remote_code,
                      pretrain_data=config.seed.pretrain_data, held_out_fraction=config.seed.held_out_fraction)
    ft = settings_of(config)
    return config.model_copy(update={
        "run_name": f"{config.run_name}-seed{seed}", "seed": shared,
        "expert_training": config.expert_training.model_copy(update={"seed": seed}),
        "finetune": ft.model_copy(update={"training": ft.training.model_copy(update={"seed": seed})})})


def planned_compute(config: BTXConfig) -> dict | None:
    """BTX's training FLOPs after the seed as the config plans them, and the experts' share (the
    paper's Table 3: 77 % experts, 23 % MoE-finetuning), for a created seed (its shape is in the
    config; None for an imported one). Counts planned steps; the vocabulary is the configured
    size, which the trained tokenizer reaches on any corpus of the demo's size."""
    spec, ft = config.seed.create, settings_of(config)
    if spec is None:
        return None
    dense = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
             "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
             "num_key_value_heads": spec.num_kv_heads, "vocab_size": spec.vocab_size}
    experts = len(config.domains) + config.mix.include_seed
    top_k = experts if ft.routing == "soft" else (ft.top_k or config.mix.top_k)
    moe = {**dense, "num_local_experts": experts, "num_experts_per_tok": top_k}
    et, tt = config.expert_training, ft.training
    expert_tokens = len(config.domains) * et.total_steps() * et.global_tokens_per_step()
    finetune_tokens = tt.total_steps() * tt.global_tokens_per_step()
    trained = 1.0 if config.branch.train == "all" else ffn_fraction(dense)  # frozen shared weights train no gradient
    expert_flops = expert_tokens * flops_per_token(dense, et.seq_len, trained)
    finetune_flops = finetune_tokens * flops_per_token(moe, tt.seq_len)
    return {"expert_tokens": expert_tokens, "finetune_tokens": finetune_tokens, "expert_flops": expert_flops,
            "finetune_flops": finetune_flops, "expert_flop_share": expert_flops / (expert_flops + finetune_flops)}


# --- one random seed -------------------------------------------------------------------------------

def run_seed(config: BTXConfig, sets: EvalSets, stage: StageCallback = lambda s: None) -> dict:
    """Train what is missing for one random seed, evaluate every model; rows and routing."""
    store = open_store(config)
    stage("seed")
    build_seed(config)
    experts = {}
    for d in config.domains:
        stage(f"expert {d.name}")
        experts[d.name] = train_expert(config, d.name).manifest
    stage("mix")
    merge = mix_stage(config).manifest.metrics.get("merge_cost")
    stage("upcycle")
    mix_stage(config, upcycle=True)
    stage("finetune btx")
    btx = finetune(config, "btx").manifest
    seed_dir = store.fetch(layout.seed_model(config.run_root), cache_dir(config))
    seed_cfg = json.loads((seed_dir / "config.json").read_text())
    ft = settings_of(config).training
    dense_fpt = flops_per_token(seed_cfg, config.expert_training.seq_len)
    # Each expert's own count (with frozen shared weights it trains less than a dense model)
    expert_cost = [StageCompute(m.metrics["tokens"], m.metrics["tokens"] * m.metrics.get("flops_per_token", dense_fpt))
                   for m in experts.values()]
    btx_cost = StageCompute(btx.metrics["tokens"], btx.metrics["tokens"] * btx.metrics["flops_per_token"])
    budgets = matched_budgets([*expert_cost, btx_cost], tokens_per_step=ft.tokens_per_step,
                              dense_fpt=flops_per_token(seed_cfg, ft.seq_len), moe_fpt=btx.metrics["flops_per_token"])
    trained = {"btx": btx}
    for name in baselines(config, MEASURED):
        stage(f"finetune {name}")
        trained[name] = finetune(config, name.split("-")[0], steps=budgets.steps(name), name=name).manifest
    if "time" in config.compare.matchings:
        experts_device = sum(device_seconds(m.metrics) for m in experts.values())
        budgets = time_matched(budgets, experts_device + device_seconds(btx.metrics),
                               upcycle_step_s=_step_seconds(trained, "upcycle"),
                               dense_step_s=_step_seconds(trained, "dense"))
        for name in ("upcycle-time", "dense-time"):
            stage(f"finetune {name}")
            trained[name] = finetune(config, name.split("-")[0], steps=budgets.steps(name), name=name).manifest
    trained = {name: trained[name] for name in ("btx", *baselines(config, BASELINES))}
    stage("evaluate")
    run = config.run_root
    models = {"seed": layout.seed_model(run), **{f"expert:{d}": layout.expert_model(run, d) for d in experts},
              "btx-mix": layout.mix_model(run), **{name: layout.trained_model(run, name) for name in trained}}
    return recorded_scores(config, sets, models, lambda: _score_seed(
        config, sets, experts, expert_cost, trained, budgets.to_dict(), merge))


def recorded_scores(config: BTXConfig, sets: EvalSets, models: dict[str, str], score: Callable[[], dict]) -> dict:
    """`score()` (one random seed's rows and routing), recorded at `<run>/compare/scores` and
    reused while every model in `models` (name -> location) has the same manifest and the held-out
    sets and scoring settings are the same: `btx compare --seeds 0,1` after one command per seed
    scores nothing again."""
    store = open_store(config)
    location = layout.compare_scores(config.run_root)
    inputs = {name: store.read_manifest(where).hash for name, where in models.items()}
    config_hash = stable_hash({"stage": "compare-scores", "format": STAGE_FORMAT, "sets": sets.describe(),
                               "include_seed": config.mix.include_seed, "precision": scoring_precision(config),
                               "compare": config.compare.model_dump(mode="json", include=SCORING_SETTINGS)})

    def make(lease) -> StageOutput:
        with tempfile.TemporaryDirectory(prefix="btx-scores-") as tmp:
            (Path(tmp) / "scores.json").write_text(json.dumps(score(), default=float))
            return StageOutput(location, store.write_dir(Path(tmp), location, stage="compare", config_hash=config_hash,
                                                         inputs=inputs, fence=lease), skipped=False)
    out = unless_done(store, config, location, config_hash, inputs, make)
    if out.skipped:
        log.info("%s: every model's scores reused from %s (same models, sets and settings)", config.run_name, location)
    return json.loads(store.read_file(location, "scores.json", out.manifest))


def scoring_precision(config: BTXConfig) -> str:
    """The precision models are scored in here (on the CPU, as `score_location` loads them): `auto`
    resolved, so scores made in bf16 on one machine are not reused as fp32 on another."""
    import torch

    from btx_core.training.distributed import resolve_precision

    return resolve_precision(config.expert_training.precision, torch.device("cpu"))


def _score_seed(config: BTXConfig, sets: EvalSets, experts: dict, expert_cost: list[StageCompute], trained: dict,
                budgets: dict, merge: dict | None) -> dict:
    """Every model of one random seed on the held-out sets, with what each cost to train."""
    experts_device = sum(device_seconds(m.metrics) for m in experts.values())
    experts_tokens = sum(c.tokens for c in expert_cost)
    experts_flops = sum(c.flops for c in expert_cost)
    experts_wall = sum(m.metrics["wall_s"] for m in experts.values())
    rows: dict[str, dict] = {}
    scores: dict[str, ModelScores] = {}
    scores["seed"] = score_location(config, layout.seed_model(config.run_root), sets)
    rows["seed"] = {**scores["seed"].losses(), "tokens": 0, "flops": 0.0, "wall_s": 0.0, "device_s": 0.0}
    for (d, manifest), cost in zip(experts.items(), expert_cost):
        scores[f"expert:{d}"] = score_location(config, layout.expert_model(config.run_root, d), sets)
        rows[f"expert:{d}"] = {**scores[f"expert:{d}"].losses(), "tokens": cost.tokens, "flops": cost.flops,
                               "wall_s": manifest.metrics["wall_s"], "device_s": device_seconds(manifest.metrics)}
    ensemble = [scores[f"expert:{d.name}"] for d in config.domains]
    if config.mix.include_seed:
        ensemble.append(scores["seed"])  # the same experts as BTX's MoE: the seed as a generalist
    experts_cost = {"tokens": experts_tokens, "flops": experts_flops, "wall_s": experts_wall,
                    "device_s": experts_device}
    for k in config.compare.btm_top_k:
        rows[f"btm-top{k}"] = {**btm_scores(ensemble, k).losses(), **experts_cost}
    routing = {}
    mix_scores = score_location(config, layout.mix_model(config.run_root), sets)
    rows["btx-mix"] = {**mix_scores.losses(), **experts_cost}
    routing["btx-mix"] = mix_scores.routing
    for name, manifest in trained.items():
        result = score_location(config, layout.trained_model(config.run_root, name), sets)
        extra = experts_cost if name == "btx" else {"tokens": 0, "flops": 0.0, "wall_s": 0.0, "device_s": 0.0}
        rows[name] = {**result.losses(), "tokens": manifest.metrics["tokens"] + extra["tokens"],
                      "flops": manifest.metrics["tokens"] * manifest.metrics["flops_per_token"] + extra["flops"],
                      "wall_s": manifest.metrics["wall_s"] + extra["wall_s"],
                      "device_s": device_seconds(manifest.metrics) + extra["device_s"]}
        if result.routing:
            routing[name] = result.routing
    return {"rows": rows, "routing": routing, "budgets": budgets, "run_name": config.run_name,
            "merge_cost": merge}


def baselines(config: BTXConfig, names: tuple[str, ...]) -> list[str]:
    """Those of `names` (upcycle-tokens, dense-time, ...) whose matching `compare.matchings` asks for."""
    return [name for name in names if name.split("-")[1] in config.compare.matchings]


def _step_seconds(trained: dict, kind: str) -> float:
    """Measured device-seconds per finetuning step of `kind` (upcycle, dense): over its token- and
    FLOP-matched runs together (those of them that ran)."""
    runs = [trained[f"{kind}-{match}"].metrics for match in ("tokens", "flops") if f"{kind}-{match}" in trained]
    return sum(device_seconds(m) for m in runs) / sum(m["steps"] for m in runs)


# --- the whole comparison --------------------------------------------------------------------------

def compare(config: BTXConfig, *, out_dir: Path | None = None, stage: StageCallback = lambda s: None) -> dict:
    """Every seed of `config.compare.seeds`, then the tables, claims and heatmaps: written to the
    store (`<run>/compare/results`) and, when given, to `out_dir`."""
    settings_of(config)  # a comparison needs the finetuning recipe: fail before any work
    started = time.perf_counter()
    stage("seed")
    build_seed(config)
    sets = eval_sets(config)
    check_seed_knows_domains(config, sets)
    per_seed = {r: run_seed(seed_config(config, r), sets, stage=lambda s, r=r: stage(f"seed {r}: {s}"))
                for r in config.compare.seeds}
    return finish_compare(config, per_seed, wall_s=time.perf_counter() - started, out_dir=out_dir, sets=sets)


def compare_seed(config: BTXConfig, seed: int, stage: StageCallback = lambda s: None) -> dict:
    """One random seed of `compare` on its own (the shared seed model is built if missing): what
    the Prefect flow `btx-compare` runs as one task per seed."""
    settings_of(config)
    build_seed(config)
    sets = eval_sets(config)
    check_seed_knows_domains(config, sets)
    return run_seed(seed_config(config, seed), sets, stage)


def check_seed_knows_domains(config: BTXConfig, sets: EvalSets) -> dict[str, float] | None:
    """`compare.seed_below_uniform`, before any branch trains: the seed's held-out loss on each
    domain must be that many nats below ln(vocab_size). Returns the losses (None: no check)."""
    margin = config.compare.seed_below_uniform
    if margin is None:
        return None
    location = layout.seed_model(config.run_root)
    seed_dir = open_store(config).fetch(location, cache_dir(config))
    vocab = json.loads((seed_dir / "config.json").read_text())["vocab_size"]  # as training/compute.py reads it
    uniform = math.log(vocab)
    losses = score_location(config, location, sets).losses()["single"]
    described = ", ".join(f"{d} {loss:.3f}" for d, loss in losses.items())
    short = [d for d, loss in losses.items() if loss > uniform - margin]
    if short:
        raise SeedTooWeakError(
            f"the seed knows too little of {', '.join(short)} to branch from: its held-out losses are "
            f"{described} nats, and compare.seed_below_uniform asks for at most ln({vocab}) - {margin:g} = "
            f"{uniform - margin:.3f} on every domain (a uniform guess scores {uniform:.3f}). Pretrain the seed "
            "longer or on text of these kinds (seed.pretrain: steps, seed.pretrain_data), or lower the "
            f"bar. The seed stays in the store at {location}; nothing was branched.")
    log.info("the seed knows its domains: held-out %s (at most %.3f asked, ln(%d) - %g)", described,
             uniform - margin, vocab, margin)
    return losses


def finish_compare(config: BTXConfig, per_seed: dict[int, dict], *, wall_s: float,
                   out_dir: Path | None = None, sets: EvalSets | None = None) -> dict:
    """The report of finished seeds (`run_seed` results, by random seed): tables, claims and
    heatmaps, written to the store (`<run>/compare/results`) and, when given, to `out_dir`."""
    domains = [d.name for d in config.domains]
    runs = {r: result["rows"] for r, result in per_seed.items()}
    report = {"run_name": config.run_name, "seeds": list(per_seed), "domains": domains,
              "eval_sets": (sets or eval_sets(config)).describe(), "summary": aggregate(runs, domains),
              "claims": claims(runs, domains), "per_seed": per_seed, "wall_s": wall_s,
              "planned_compute": planned_compute(config),
              "config": config.model_dump(mode="json")}
    with tempfile.TemporaryDirectory(prefix="btx-compare-") as tmp:
        files = write_report(report, Path(tmp))
        store: Store = open_store(config)
        with stage_lease(store, config, layout.compare_results(config.run_root)) as lease:
            store.write_dir(Path(tmp), layout.compare_results(config.run_root), stage="compare", fence=lease,
                            config_hash=f"seeds={report['seeds']}", metrics={"wall_s": report["wall_s"]})
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in files:
                (out_dir / f.name).write_bytes(f.read_bytes())
    report["location"] = layout.compare_results(config.run_root)
    return report


def tables_markdown(report: dict) -> list[str]:
    """The report's title, loss tables and claims, as markdown sections (results.md's head, and
    the `btx-compare` flow's artifact)."""
    domains, seeds = report["domains"], report["seeds"]
    return [f"# {report['run_name']}: BTX vs baselines, seeds {', '.join(map(str, seeds))}\n",
            markdown_table(report["summary"], domains, seeds),
            "## Mixed-domain blocks, by the domain of each segment\n", mixed_table(report["summary"], domains),
            *merge_cost_section(report),
            "## The paper's claims, seed by seed\n", claims_markdown(report["claims"])]


def merge_cost_section(report: dict) -> list[str]:
    """What MiX cost each domain before finetuning (btx_core/evaluation/merge_cost.py), over seeds."""
    costs = {seed: result.get("merge_cost") for seed, result in report["per_seed"].items()}
    table = merge_cost.across_seeds_markdown(costs)
    made = next((c["settings"] for c in costs.values() if c and c.get("settings")), {})
    made = {**made, **merge_cost.finetune_levers((report.get("config") or {}).get("finetune") or {})}
    return ["## What the merge cost, before finetuning\n", merge_cost.levers(made) + "\n", table] if table else []


# The models whose routing is drawn for every seed (CSV: every MoE row, every seed).
HEATMAPS = ("btx", "btx-mix")


def write_report(report: dict, directory: Path) -> list[Path]:
    """results.json, results.md and, for every seed, each MoE's routing per layer: CSVs of both
    sets (top-1 and top-k shares) and heatmaps of BTX and MiX-only (top-1)."""
    files = [directory / "results.json"]
    files[0].write_text(json.dumps(report, indent=1, sort_keys=False, default=float))
    md = [*tables_markdown(report), "## Routing per layer, every seed\n"]
    for seed in report["seeds"]:
        if cost := report["per_seed"][seed].get("merge_cost"):
            md += [f"### Seed {seed}: what the merge cost\n", merge_cost.markdown(cost)]
        models = report["per_seed"][seed]["routing"]
        if "btx" in models:
            md += [f"### Seed {seed}: BTX per layer, single-domain set\n",
                   routing_layers_markdown(models["btx"]["single"])]
        for name, routing in models.items():
            for kind in ("single", "mixed"):
                for key in ("by_domain_top1", "by_domain_topk"):
                    stem = f"routing-{name}-seed{seed}-{kind}-{key.removeprefix('by_domain_')}"
                    csv = directory / f"{stem}.csv"
                    csv.write_text(routing_csv(routing[kind], key))
                    files.append(csv)
                    if name not in HEATMAPS or key != "by_domain_top1":
                        continue
                    png = routing_heatmap(routing[kind], directory / f"{stem}.png", key=key,
                                          title=f"{name}, {kind}-domain set, seed {seed}: share of each "
                                                "domain's tokens per expert (top-1)")
                    files.append(png)
                    md.append(f"![{stem}]({png.name})\n")
    (directory / "results.md").write_text("\n".join(md))
    files.append(directory / "results.md")
    return files
