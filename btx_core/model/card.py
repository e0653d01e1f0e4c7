"""The model card (README.md) of a mixed MoE: what it is, where every expert came from, the
options used and how the new routers route at the start. Hub-style YAML front matter."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path


def _options_json(options) -> dict:
    data = asdict(options) if is_dataclass(options) else dict(options)
    return json.loads(json.dumps(data, default=str))


def write_model_card(out_dir: Path, *, config: Mapping, experts: Sequence, options, routing: Mapping,
                     shared_weights: Sequence[float], extra: Mapping) -> None:
    arch = config["architectures"][0]
    lines = ["---", "library_name: transformers", "tags: [moe, btx, branch-train-mix]", "---", "",
             f"# {extra.get('title', 'Branch-Train-MiX mixture of experts')}", "",
             f"A `{arch}` with {len(experts)} experts per layer, top-{config['num_experts_per_tok']} routing, "
             f"made by [btx](https://arxiv.org/abs/2403.07816) from dense models of one seed: in every "
             "layer expert i is dense model i's FFN; the other tensors are merged; the routers are new "
             "and still need MoE-finetuning.", "",
             "## Experts (lineage)", "",
             "| # | expert | source | manifest | weight in the shared merge |", "|---|---|---|---|---|"]
    for i, (e, w) in enumerate(zip(experts, shared_weights)):
        lines.append(f"| {i} | {e.name} | `{e.source or e.path}` | {(e.manifest_hash or '-')[:16]} | {w:.4g} |")
    lines += ["", "## Options", "", "```json", json.dumps(_options_json(options), indent=2, sort_keys=True),
              "```", "",
              f"Load balancing: `router_aux_loss_coef` = {config['router_aux_loss_coef']:.4g} = alpha x "
              f"num_layers ({config['num_hidden_layers']}). The paper adds alpha * N * sum_i u_i p_i per "
              "layer and sums over layers; transformers computes the loss once from statistics averaged "
              "over layers, so alpha x num_layers gives the paper's scale. `output_router_logits` is on, "
              "so a forward pass with labels includes it in the loss.", ""]
    for key, value in extra.items():
        if key != "title":
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
