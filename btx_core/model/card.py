"""Model cards (README.md) of what btx writes: the mixed MoE and a finetuned model. Hub-style YAML
front matter (base_model, base_model_relation, license, pipeline_tag, tags), so the Hub and
`huggingface_hub.ModelCard` place the model in its seed's family tree; then what it is, where every
expert came from, the options used and how the new routers route at the start."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import yaml


def read_front_matter(model_dir: Path) -> dict:
    """The YAML front matter of a model directory's README.md ({} when it has none)."""
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return {}
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def seed_lineage(seed_dir: Path | None, given: str | None) -> dict:
    """base_model and license for a model made from the seed: the seed's own card's base_model
    when it has one (the seed is then itself a derivative), else the seed as the user named it."""
    meta = read_front_matter(seed_dir) if seed_dir else {}
    out = {"base_model": meta.get("base_model") or given}
    if meta.get("license"):
        out["license"] = meta["license"]
    return {k: v for k, v in out.items() if v}


def front_matter(meta: Mapping) -> list[str]:
    return ["---", yaml.safe_dump(dict(meta), sort_keys=False).rstrip(), "---", ""]


def _options_json(options) -> dict:
    data = asdict(options) if is_dataclass(options) else dict(options)
    return json.loads(json.dumps(data, default=str))


def write_model_card(out_dir: Path, *, config: Mapping, experts: Sequence, options, routing: Mapping,
                     shared_weights: Sequence[float], extra: Mapping) -> None:
    arch, model_type = config["architectures"][0], config["model_type"]
    lineage = {k: extra[k] for k in ("base_model", "license") if extra.get(k)}
    if "base_model" not in lineage:
        lineage = seed_lineage(experts[0].path, str(experts[0].source or experts[0].path)) | lineage
    meta = {**({"base_model": lineage["base_model"]} if lineage.get("base_model") else {}),
            "base_model_relation": "merge",
            **({"license": lineage["license"]} if lineage.get("license") else {}),
            "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["btx", "branch-train-mix", "moe", model_type],
            "btx": {"experts": [e.name for e in experts], "top_k": config["num_experts_per_tok"]}}
    lines = [*front_matter(meta),
             f"# {extra.get('title', 'Branch-Train-MiX mixture of experts')}", "",
             f"A `{arch}` with {len(experts)} experts per layer, top-{config['num_experts_per_tok']} routing, "
             f"made by [btx](https://arxiv.org/abs/2403.07816) from dense models of one seed"
             f"{' (`' + str(lineage['base_model']) + '`)' if lineage.get('base_model') else ''}: in every "
             "layer expert i is dense model i's FFN; the other tensors are merged; the routers are new "
             "and still need MoE-finetuning.", "",
             "## Experts (lineage)", "",
             "| # | expert | source | manifest | weight in the shared merge |", "|---|---|---|---|---|"]
    for i, (e, w) in enumerate(zip(experts, shared_weights)):
        lines.append(f"| {i} | {e.name} | `{e.source or e.path}` | {(e.manifest_hash or '-')[:16]} | {w:.4g} |")
    lines += ["", "## Options", "", "```json", json.dumps(_options_json(options), indent=2, sort_keys=True),
              "```", "",
              f"Load balancing: `router_aux_loss_coef` = {config['router_aux_loss_coef']:.4g} = alpha x "
              f"num_layers ({config['num_hidden_layers']}), for transformers' own loss, which it averages over "
              "layers. The paper adds alpha * N * sum_i u_i p_i per layer (u_i summing to 1 over experts) and "
              "sums over layers; btx's finetune trains with that form by default. `output_router_logits` is "
              "off in this config (inference needs no router logits); finetuning turns it on for its run.", ""]
    for key, value in extra.items():
        if key not in ("title", "base_model", "license"):
            lines += [f"{key}: {value}", ""]
    if routing:
        lines += ["## Routing at initialisation (held-out sample)", "",
                  f"Router init `{routing['init']}`. Entropy in nats (uniform = log {len(experts)}); load = "
                  "share of top-k assignments per expert.", "",
                  "| layer | entropy | " + " | ".join(routing["experts"]) + " |",
                  "|---|---|" + "---|" * len(routing["experts"])]
        for layer, (h, load) in enumerate(zip(routing["entropy"], routing["load"])):
            lines.append(f"| {layer} | {h:.3f} | " + " | ".join(f"{x:.2f}" for x in load) + " |")
        lines.append("")
    (out_dir / "README.md").write_text("\n".join(lines))


def append_section(out_dir: Path, title: str, body: str) -> None:
    """Add a `## title` section at the end of a model directory's README.md."""
    card = Path(out_dir) / "README.md"
    card.write_text(card.read_text().rstrip("\n") + f"\n\n## {title}\n\n{body.rstrip()}\n")


def write_finetune_card(out_dir: Path, *, config: Mapping, source: str, source_card: Mapping,
                        stage: str, metrics: Mapping) -> None:
    """The card of a trained model: `source` (the model it was trained from) as base_model; the
    source card's license, tags and expert names carried over."""
    names = (source_card.get("btx") or {}).get("experts") or config.get("btx_expert_names")
    tags = list(dict.fromkeys([*(source_card.get("tags") or ["btx"]), config.get("model_type", "")]))
    meta = {"base_model": source, "base_model_relation": "finetune",
            **({"license": source_card["license"]} if source_card.get("license") else {}),
            "library_name": "transformers", "pipeline_tag": "text-generation", "tags": [t for t in tags if t],
            **({"btx": {"experts": list(names)}} if names else {})}
    loss = metrics.get("heldout_loss")
    lines = [*front_matter(meta), f"# {config.get('architectures', ['model'])[0]} trained by btx ({stage})", "",
             f"Trained from `{source}` by the btx `{stage}` stage"
             + (f"; held-out loss {loss:.4f}." if isinstance(loss, float) else "."), ""]
    if names:
        lines += [f"Experts: {', '.join(names)}.", ""]
    (out_dir / "README.md").write_text("\n".join(lines))
