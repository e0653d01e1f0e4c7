"""`btx ablate`: the BTX paper's ablations (sections 4.3-4.4) at one random seed, each one line of
config on top of a comparison's config: router init, load balancing off (or transformers' form),
the seed's non-FFN tensors in or out of the shared mean, and top-2 vs top-1 vs soft vs sampled
top-1 routing, and a router warm-up.

Every ablation starts from the same seed and experts as the config's own random seed (the run of
`btx compare`'s first row; trained here if missing) and redoes only what its line changes: a MiX
line mixes anew into `<run>/ablations/<name>/mix`, and every line MoE-finetunes into
`<run>/trained/ablation-<name>` with the config's budget. Nothing of the reference run is
rewritten. The reference row is the unchanged config's BTX; all rows are scored on the same
held-out sets as `btx compare`, with each finetuned MoE's routing per layer (does an expert die
without load balancing, as the paper's code expert did?).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from btx_core.config.schema import BTXConfig
from btx_core.errors import BTXError, ConfigError
from btx_core.evaluation.report import routing_layers_markdown, routing_summary
from btx_core.stages.common import open_store, stage_lease
from btx_core.stages.evaluate import eval_sets, score_location
from btx_core.stages.expert import train_expert
from btx_core.stages.finetune import finetune
from btx_core.stages.mix import mix_stage
from btx_core.stages.seed import build_seed
from btx_core.store import layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ablation:
    name: str
    line: str
    """`section.key` of the config."""
    value: Any
    question: str


ABLATIONS = (
    Ablation("router-centroid", "mix.router_init", "centroid",
             "Router rows set to each expert's mean hidden state on its own domain, instead of random"),
    Ablation("router-normal", "mix.router_init", "normal",
             "Router rows drawn at random, N(0, initializer_range^2), as transformers inits a new Mixtral"),
    Ablation("no-load-balancing", "finetune.load_balancing", False,
             "No load-balancing loss: does an expert die (the paper's code expert did)?"),
    Ablation("transformers-load-balancing", "finetune.load_balancing_loss", "transformers",
             "transformers' aux loss (pooled over layers, top-k counted k times) instead of the paper's"),
    Ablation("seed-in-shared-mean", "mix.seed_in_shared_mean", True,
             "The seed's attention and embeddings averaged in with the experts' (the paper's mean)"),
    Ablation("top-1", "finetune.top_k", 1, "Top-1 routing instead of top-2"),
    Ablation("soft-routing", "finetune.routing", "soft", "Soft routing: every expert, by the full softmax"),
    Ablation("sample-top-1", "finetune.routing", "sample_top1",
             "Sampled top-1 (Gumbel-softmax, temperature annealed) instead of top-2"),
    Ablation("router-warmup", "finetune.router_warmup_steps", 4,
             "Only the routers train for the finetune's first 4 steps (experts and shared weights held)"),
    Ablation("router-lr", "finetune.router_lr", 1e-2,
             "The routers train at lr 1e-2 (everything else at the finetune's own lr)"),
)
BY_NAME = {a.name: a for a in ABLATIONS}
StageCallback = Callable[[str], None]


def with_line(config: BTXConfig, line: str, value: Any) -> BTXConfig:
    """`config` with one `section.key` set, validated as the config file would be."""
    section_name, _, key = line.partition(".")
    section = getattr(config, section_name, None)
    if section is None or key not in type(section).model_fields:
        raise ConfigError([f"ablation line {line!r}: the config has no such setting"
                           + (" (add a `finetune` section)" if section_name == "finetune" else "")])
    try:
        updated = type(section).model_validate({**section.model_dump(), key: value})
    except ValidationError as exc:
        raise ConfigError([f"ablation line {line}: {json.dumps(value)}: {exc.errors()[0]['msg']}"]) from None
    return config.model_copy(update={section_name: updated})


def current(config: BTXConfig, line: str) -> Any:
    """The config's own value of a `section.key` line (None where the section is absent)."""
    section, _, key = line.partition(".")
    return getattr(getattr(config, section, None), key, None)


def select(names: list[str] | None) -> list[Ablation]:
    if not names:
        return list(ABLATIONS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise BTXError(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def ablate(config: BTXConfig, *, only: list[str] | None = None, out_dir: Path | None = None,
           stage: StageCallback = lambda s: None) -> dict:
    """The reference BTX and each ablation, scored on the comparison's held-out sets; the table
    is written to the store (`<run>/ablations/results`) and, when given, to `out_dir`."""
    if config.finetune is None:
        raise ConfigError(["btx ablate needs a `finetune` section: every ablation MoE-finetunes"])
    chosen, skipped = [], {}
    for a in select(only):  # a line the config already has would only retrain the reference
        if current(config, a.line) == a.value:
            skipped[a.name] = f"{a.line}: {json.dumps(a.value)}"
            log.warning("ablation %s skipped: the config already has `%s`", a.name, skipped[a.name])
        else:
            chosen.append(a)
    if not chosen:
        raise ConfigError([f"nothing to ablate: the config already has {', '.join(skipped.values())}; "
                           "choose other ablations with --only"])
    variants = {a.name: with_line(config, a.line, a.value) for a in chosen}  # all validated first
    started = time.perf_counter()
    stage("reference: seed, experts, MiX, finetune")
    build_seed(config)
    for d in config.domains:
        train_expert(config, d.name)
    mix_stage(config)
    reference = finetune(config, "btx")
    sets = eval_sets(config)
    stage("evaluate reference")
    rows = {"reference": _row(config, layout.trained_model(config.run_root, "btx"),
                              reference.manifest.metrics, sets)}
    rows["reference"]["mix_only"] = score_location(config, layout.mix_model(config.run_root), sets).losses()
    for ablation in chosen:
        variant = variants[ablation.name]
        source = None
        if ablation.line.startswith("mix."):
            stage(f"{ablation.name}: mix")
            source = mix_stage(variant, location=layout.ablation_mix(config.run_root, ablation.name)).location
        stage(f"{ablation.name}: finetune")
        name = f"ablation-{ablation.name}"
        trained = finetune(variant, "btx", name=name, source=source)
        stage(f"{ablation.name}: evaluate")
        row = _row(variant, layout.trained_model(config.run_root, name), trained.manifest.metrics, sets)
        if source is not None:
            row["mix_only"] = score_location(variant, source, sets).losses()
        rows[ablation.name] = {**row, "line": f"{ablation.line}: {json.dumps(ablation.value)}",
                               "question": ablation.question}
    report = {"run_name": config.run_name, "seed": config.expert_training.seed,
              "domains": [d.name for d in config.domains], "eval_sets": sets.describe(), "rows": rows,
              "skipped": skipped, "wall_s": time.perf_counter() - started}
    _write(config, report, out_dir)
    return report


def _row(config: BTXConfig, location: str, metrics: dict, sets) -> dict:
    scores = score_location(config, location, sets)
    return {**scores.losses(), "routing": scores.routing, "steps": metrics.get("steps"),
            "final_load_balancing_loss": metrics.get("final_load_balancing_loss"),
            "device_s": metrics.get("wall_s")}


def ablations_markdown(report: dict) -> str:
    domains, rows = report["domains"], report["rows"]
    ref = rows["reference"]["average"]
    lines = [f"# {report['run_name']}: ablations, random seed {report['seed']}\n",
             "| Ablation (one config line) | " + " | ".join(domains)
             + " | Average | vs BTX | Mixed-domain | MiX only (average) | Least-used expert, lowest layer |",
             "|---" * (len(domains) + 6) + "|"]
    for name, row in rows.items():
        label = "BTX (the config as is)" if name == "reference" else f"{name}: `{row['line']}`"
        low = routing_summary(row["routing"]["single"])["least_used"] if row.get("routing") else []
        layer, (expert, share) = min(enumerate(low), key=lambda x: x[1][1]) if low else (None, ("", 0.0))
        mix_only = f"{row['mix_only']['average']:.3f}" if "mix_only" in row else "(same as BTX's)"
        losses = " | ".join(f"{row['single'][d]:.3f}" for d in domains)
        least = f"{expert} {share:.1%} (layer {layer})" if low else "–"
        lines.append(f"| {label} | {losses} | {row['average']:.3f} | {row['average'] - ref:+.3f} "
                     f"| {row.get('mixed', float('nan')):.3f} | {mix_only} | {least} |")
    lines.append("\nHeld-out loss in nats per token (lower is better); every row has the same seed, experts, "
                 "budget and held-out blocks. Least-used expert: its share of the routed slots on the "
                 "single-domain set, in the layer where it is lowest.\n")
    if skipped := report.get("skipped"):
        lines.append("Not run, the config already has the line: "
                     + "; ".join(f"{name} (`{line}`)" for name, line in skipped.items()) + ".\n")
    for name, row in rows.items():
        if row.get("routing"):
            lines += [f"## {name}: routing per layer, single-domain set\n",
                      routing_layers_markdown(row["routing"]["single"])]
    return "\n".join(lines)


def _write(config: BTXConfig, report: dict, out_dir: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="btx-ablate-") as tmp:
        files = {"ablations.json": json.dumps(report, indent=1, default=float),
                 "ablations.md": ablations_markdown(report)}
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        store, location = open_store(config), layout.ablation_results(config.run_root)
        with stage_lease(store, config, location) as lease:
            store.write_dir(Path(tmp), location, stage="ablate", config_hash=",".join(report["rows"]),
                            metrics={"wall_s": report["wall_s"]}, fence=lease)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (out_dir / name).write_text(text)
