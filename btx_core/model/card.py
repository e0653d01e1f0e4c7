"""Model cards (README.md) of what btx writes: the mixed MoE and a finetuned model, with front
matter the Hugging Face Hub accepts. `base_model` is a Hub repo id or absent (never a store
location or a local path: the Hub would reject the card); the store lineage goes under `btx:`,
with any credentials in a URI dropped. Then what the model is, where every expert came from, the
options, the recipe (data, steps, tokens, lr per stage), and once evaluated the held-out table,
also as `model-index` so the Hub lists it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

# owner/name, as the Hub spells repo ids (huggingface_hub.utils.validate_repo_id).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def read_front_matter(model_dir: Path) -> dict:
    """The YAML front matter of a model directory's README.md ({} when it has none)."""
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return {}
    return split_card(card.read_text(errors="replace"))[0]


def split_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a card's text; ({}, text) when it has no valid front matter."""
    if not text.startswith("---"):
        return {}, text
    block, _, body = text[3:].partition("\n---")
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}, text
    return (data, body.partition("\n")[2]) if isinstance(data, dict) else ({}, text)


def hub_id(value) -> str | None:
    """`value` when it names a Hub repo (owner/name); None for store URIs, local paths (absolute,
    relative or existing) and anything else. A bare name (`gpt2`) counts only when the seed stage
    recorded that it downloaded it from the Hub (`seed_lineage`'s `hub`)."""
    if not isinstance(value, str) or "://" in value or ".." in value or value.startswith((".", "~")):
        return None
    return value if REPO_ID.match(value) and not Path(value).exists() else None


def hub_ids(value) -> list[str]:
    """The Hub ids in a card's `base_model` (a string or a list of them)."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if hub_id(v)]


def public_location(location) -> str:
    """A store location as a card may show it: a URI without user, password or query (where
    credentials could hide); a local path as it is."""
    text = str(location)
    parts = urlsplit(text)
    if "://" not in text or not parts.scheme:
        return text
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def seed_lineage(seed_dir: Path | None, given: str | None, hub: str | None = None) -> dict:
    """base_model, license and the store lineage for a model made from the seed. base_model: the
    seed's Hub id (`hub`, recorded when the seed stage downloaded it, or `given` when it is one),
    else the first Hub id its own card names as base_model, else none. `seed`: where the seed
    came from, for the `btx:` lineage."""
    meta = read_front_matter(seed_dir) if seed_dir else {}
    base = hub or hub_id(given) or next(iter(hub_ids(meta.get("base_model"))), None)
    out = {"base_model": base, "license": meta.get("license"),
           "seed": public_location(given) if given else None}
    return {k: v for k, v in out.items() if v}


LINEAGE = ("base_model", "license", "seed")


def front_matter(meta: Mapping) -> list[str]:
    return ["---", yaml.safe_dump(dict(meta), sort_keys=False).rstrip(), "---", ""]


def _options_json(options) -> dict:
    data = asdict(options) if is_dataclass(options) else dict(options)
    return json.loads(json.dumps(data, default=str))


def write_model_card(out_dir: Path, *, config: Mapping, experts: Sequence, options, routing: Mapping,
                     shared_weights: Sequence[float], extra: Mapping) -> None:
    """`extra`: `title`, the seed's lineage (`seed_lineage`: base_model, license, seed) when the
    caller knows it (else read from the first expert's card), and notes printed as `key: value`."""
    arch, model_type = config["architectures"][0], config["model_type"]
    lineage = {k: extra[k] for k in LINEAGE if extra.get(k)}
    if "seed" not in lineage:  # `btx mix` of directories: the first expert's card (it is no seed itself)
        found = seed_lineage(experts[0].path, str(experts[0].source or experts[0].path))
        lineage = {k: v for k, v in found.items() if k != "seed"} | lineage
    base = next(iter(hub_ids(lineage.get("base_model"))), None)
    store = {"seed": lineage.get("seed"), "experts": {e.name: public_location(e.source or e.path) for e in experts}}
    meta = {**({"base_model": base, "base_model_relation": "merge"} if base else {}),
            **({"license": lineage["license"]} if lineage.get("license") else {}),
            "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["btx", "branch-train-mix", "moe", model_type],
            "btx": {"experts": [e.name for e in experts], "top_k": config["num_experts_per_tok"],
                    "lineage": {k: v for k, v in store.items() if v}}}
    lines = [*front_matter(meta),
             f"# {extra.get('title', 'Branch-Train-MiX mixture of experts')}", "",
             f"A `{arch}` with {len(experts)} experts per layer, top-{config['num_experts_per_tok']} routing, "
             f"made by [btx](https://arxiv.org/abs/2403.07816) from dense models of one seed"
             f"{' (`' + base + '`)' if base else ''}: in every "
             "layer expert i is dense model i's FFN; the other tensors are merged; the routers are new "
             "and still need MoE-finetuning.", "",
             "## Experts (lineage)", "",
             "| # | expert | source | manifest | weight in the shared merge |", "|---|---|---|---|---|"]
    for i, (e, w) in enumerate(zip(experts, shared_weights)):
        lines.append(f"| {i} | {e.name} | `{public_location(e.source or e.path)}` | {(e.manifest_hash or '-')[:16]} "
                     f"| {w:.4g} |")
    lines += ["", "## Options", "", "```json", json.dumps(_options_json(options), indent=2, sort_keys=True),
              "```", "",
              f"Load balancing: `router_aux_loss_coef` = {config['router_aux_loss_coef']:.4g} = alpha x "
              f"num_layers ({config['num_hidden_layers']}), for transformers' own loss, which it averages over "
              "layers. The paper adds alpha * N * sum_i u_i p_i per layer (u_i summing to 1 over experts) and "
              "sums over layers; btx's finetune trains with that form by default. `output_router_logits` is "
              "off in this config (inference needs no router logits); finetuning turns it on for its run.", ""]
    for key, value in extra.items():
        if key not in ("title", *LINEAGE):
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
                        stage: str, metrics: Mapping, lineage: Mapping | None = None,
                        recipe: Sequence[Mapping] = (), lr: float | None = None,
                        sections: Mapping[str, str] | None = None) -> None:
    """The card of a trained model. base_model: the Hub id of its lineage (`lineage`, from
    `seed_lineage`; else `source` or the source card's base_model when a Hub id), else none;
    `btx.lineage`: `source` (the model it was trained from) and the seed, as stored. License,
    tags and expert names carried over from the source card; `recipe`: the stages before this
    one (`recipe_markdown`), this one's row added from `metrics` and its peak `lr`; `sections`:
    title -> markdown."""
    lineage = lineage or {}
    names = (source_card.get("btx") or {}).get("experts") or config.get("btx_expert_names")
    tags = list(dict.fromkeys([*(source_card.get("tags") or ["btx"]), config.get("model_type", "")]))
    inherited = hub_ids(source_card.get("base_model"))
    base = next(iter([*hub_ids(lineage.get("base_model")), *hub_ids(source), *inherited]), None)
    # A merge's relation carries over (its weights are still a merge of the base's finetunes).
    relation = source_card.get("base_model_relation", "finetune") if base in inherited else "finetune"
    store = {"source": public_location(source), "seed": lineage.get("seed")}
    meta = {**({"base_model": base, "base_model_relation": relation} if base else {}),
            **({"license": source_card["license"]} if source_card.get("license") else {}),
            "library_name": "transformers", "pipeline_tag": "text-generation", "tags": [t for t in tags if t],
            "btx": {**({"experts": list(names)} if names else {}), "stage": stage,
                    "lineage": {k: v for k, v in store.items() if v}}}
    loss = metrics.get("heldout_loss")
    lines = [*front_matter(meta), f"# {config.get('architectures', ['model'])[0]} trained by btx ({stage})", "",
             f"Trained from `{public_location(source)}` by the btx `{stage}` stage"
             + (f"; held-out loss on its training mixture {loss:.4f}." if isinstance(loss, float) else "."), ""]
    if names:
        lines += [f"Experts: {', '.join(names)}.", ""]
    mixture = ", ".join(f"{k} {v:.0%}" for k, v in (metrics.get("mixture") or {}).items())
    rows = [*recipe, {"stage": stage, "data": mixture, "steps": metrics.get("steps"),
                      "tokens": metrics.get("tokens"), "lr": lr}]
    lines += ["## Recipe", "", recipe_markdown(rows), ""]
    for title, body in (sections or {}).items():
        lines += [f"## {title}", "", body.rstrip(), ""]
    (out_dir / "README.md").write_text("\n".join(lines))


# --- the recipe and the held-out evaluation ---------------------------------------------------------

def recipe_markdown(rows: Sequence[Mapping]) -> str:
    """One row per training stage: its data, optimizer steps, training tokens and peak lr."""
    def cell(value, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| stage | data | steps | tokens | peak lr |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r.get('data') or '-'} | {cell(r.get('steps'))} | {cell(r.get('tokens'), ',')} "
              f"| {cell(r.get('lr'), '.3g')} |" for r in rows]
    return "\n".join(lines) + "\n"


EVALUATION = "Held-out evaluation"


def evaluation_markdown(losses: Mapping[str, Mapping], domains: Sequence[str], model: str) -> str:
    """Held-out loss (nats/token) per domain, their average and the mixed-domain set: `model`
    beside the seed, each domain's own expert, BTM and MiX when `losses` (the evaluate stage's
    results) has them."""
    others = [m for m in ("seed", *sorted(m for m in losses if m.startswith("btm")), "btx-mix") if m in losses]
    columns = [*others[:1], "own expert", *others[1:], model]

    def value(column: str, row: str):
        if column == "own expert":
            return (losses.get(f"expert:{row}") or {}).get("single", {}).get(row)
        result = losses[column]
        return result["single"].get(row) if row in domains else result.get(row)

    lines = ["| held-out set | " + " | ".join(f"**{c}**" if c == model else c for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row in [*domains, "average", "mixed"]:
        cells = [value(c, row) for c in columns]
        lines.append(f"| {row} | " + " | ".join("-" if x is None else f"{x:.4f}" for x in cells) + " |")
    return "\n".join(lines) + ("\n\nLoss in nats per token on the run's held-out blocks (lower is better); "
                               "`mixed`: blocks spliced from several domains.\n")


def model_index(name: str, results: Mapping, domains: Sequence[str]) -> list[dict]:
    """The Hub's `model-index` of one model's held-out losses (`results`: the evaluate stage's
    entry for it): one result per domain and one for the mixed-domain set, loss and perplexity;
    a set without a finite loss is left out."""
    sets = [(d, f"{d} (held-out)", results["single"].get(d)) for d in domains]
    sets.append(("mixed-domain", "Mixed-domain blocks (held-out)", results.get("mixed")))  # none for one domain
    return [{"name": name, "results": [
        {"task": {"type": "text-generation", "name": "Held-out language modelling"},
         "dataset": {"type": kind, "name": label, "split": "heldout"},
         "metrics": [{"type": "loss", "name": "Held-out loss (nats/token)", "value": round(float(loss), 4)},
                     {"type": "perplexity", "name": "Held-out perplexity", "value": round(math.exp(loss), 3)}]}
        for kind, label, loss in sets if loss is not None and math.isfinite(loss)]}]


def with_evaluation(text: str, index: list[dict], table: str) -> str:
    """A card's text with `model-index` in its front matter and the held-out table as its last
    section, replacing those of an earlier evaluation."""
    meta, body = split_card(text)
    meta = {**meta, "model-index": index}
    marker = f"\n## {EVALUATION}\n"
    before, found, after = body.partition(marker)
    if found:  # keep what follows the old table's section
        rest = after.partition("\n## ")
        body = before + (f"\n## {rest[2]}" if rest[1] else "")
    return "\n".join(front_matter(meta)) + body.rstrip("\n") + f"\n\n## {EVALUATION}\n\n{table.rstrip()}\n"
