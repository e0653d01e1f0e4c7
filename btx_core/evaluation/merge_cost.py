"""What MiX costs, measured on every mix: where the experts' weights went, and what the merge and
the new routers each cost every domain in held-out loss.

BTX keeps each expert's FFNs and merges everything else (attention, embeddings, norms); the
routers start untrained. Before finetuning, a domain's loss through the mixed model can be worse
than its expert's for either reason, and these numbers tell them apart:
- **weight distances**, per kind of tensor (`families.py`'s `tensor_kinds`): each expert's
  relative distance from the seed, ||expert - seed|| / ||seed||; the cosine of every two experts'
  updates (expert - seed): near 1 they moved alike and their mean keeps both moves, near 0 the
  mean keeps about 1/N of each; and the merged weights' distance from each expert, on the same scale
  (what the merge undid of that expert's move). Streamed a chunk at a time through
  `CheckpointReader`: every quantity is an inner product of updates, so one Gram matrix per
  kind holds them all, and memory holds one chunk per model, never a whole model.
- **losses**, per domain, on a few held-out blocks: the expert alone; the mixed model routed to
  that expert alone at weight 1 (the oracle: the routers taken out); the mixed model as its
  routers route. oracle - expert is what the merged shared weights cost the domain (0 when the
  experts trained their FFNs only, `branch.train: ffn`); mix - oracle is what the routers cost.
  One model in memory at a time.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from btx_core.model.families import TENSOR_KINDS, tensor_kinds
from btx_core.model.tensor_io import CheckpointReader

CHUNK = 1 << 21  # elements per model held at once (16 MB in fp64)


# --- weight distances ------------------------------------------------------------------------------

def weight_distances(seed: Path, experts: Mapping[str, Path],
                     merge_weights: Mapping[str, float] | None = None) -> dict:
    """Per tensor kind: each expert's relative distance from `seed`, the pairwise cosines of the
    experts' updates and (with `merge_weights`, the shared merge's weight of each expert, summing
    to 1) the merged weights' distance from each expert, relative to the seed's norm like the
    first. FFNs are reported for scale; they are kept per expert, never merged."""
    kinds = tensor_kinds(json.loads((Path(seed) / "config.json").read_text()))
    names = list(experts)
    base, readers = CheckpointReader(seed), [CheckpointReader(p) for p in experts.values()]
    gram = {k: np.zeros((len(names), len(names))) for k in TENSOR_KINDS}
    seed_sq, params = dict.fromkeys(TENSOR_KINDS, 0.0), dict.fromkeys(TENSOR_KINDS, 0)
    for name, kind in kinds.items():
        flat = [base.get(name).reshape(-1)] + [r.get(name).reshape(-1) for r in readers]
        params[kind] += flat[0].numel()
        for start in range(0, flat[0].numel(), CHUNK):
            chunk = [t[start:start + CHUNK].double() for t in flat]
            updates = torch.stack(chunk[1:]) - chunk[0]
            seed_sq[kind] += float(chunk[0].square().sum())
            gram[kind] += (updates @ updates.T).numpy()
    weights = np.array([(merge_weights or {}).get(n, 0.0) for n in names])
    return {"experts": names, "kinds": {
        kind: _kind_report(names, gram[kind], seed_sq[kind], params[kind],
                           weights if merge_weights and kind != "ffn" else None)
        for kind in TENSOR_KINDS if params[kind]}}


def _kind_report(names: list[str], gram: np.ndarray, seed_sq: float, params: int,
                 weights: np.ndarray | None) -> dict:
    scale = math.sqrt(seed_sq) or 1.0
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    report = {"params": params, "seed_norm": math.sqrt(seed_sq),
              "distance": {n: float(norms[i] / scale) for i, n in enumerate(names)},
              "cosine": {f"{a}|{b}": float(gram[i, j] / (norms[i] * norms[j])) if norms[i] * norms[j] > 0 else None
                         for i, a in enumerate(names) for j, b in enumerate(names) if i < j}}
    if weights is not None:
        # merged - expert e = sum_j w_j u_j - u_e (u: updates; the weights sum to 1)
        merged = weights @ gram @ weights - 2 * gram @ weights + np.diag(gram)
        report["merged_distance"] = {n: float(math.sqrt(max(merged[i], 0.0)) / scale) for i, n in enumerate(names)}
    return report


# --- held-out losses: expert alone, oracle routing, routed -------------------------------------------

def _loss(model, blocks, batch_size: int, precision: str) -> float:
    from btx_core.evaluation.scores import token_logprobs

    return float(-token_logprobs(model, np.asarray(blocks, dtype=np.int64), batch_size=batch_size,
                                 precision=precision).mean())


def oracle_losses(moe_dir: Path, experts: Mapping[str, Path], heldout: Mapping[str, object], *,
                  batch_size: int = 8, precision: str = "fp32") -> dict[str, dict[str, float]]:
    """Domain -> {expert, oracle, mix} held-out losses (nats/token) on `heldout` (domain -> token
    blocks [n, T]; each domain names an expert of the MoE and a key of `experts`, its dense model)."""
    from btx_core.model.dense import load_causal_lm
    from btx_core.moe.routing import forced_expert

    moe, _ = load_causal_lm(str(moe_dir), allow_moe=True)
    names = list(moe.config.btx_expert_names)
    out = {}
    for domain, blocks in heldout.items():
        with forced_expert(moe, names.index(domain)):
            oracle = _loss(moe, blocks, batch_size, precision)
        out[domain] = {"oracle": oracle, "mix": _loss(moe, blocks, batch_size, precision)}
    del moe
    gc.collect()
    for domain in heldout:
        model, _ = load_causal_lm(str(experts[domain]))
        out[domain]["expert"] = _loss(model, heldout[domain], batch_size, precision)
        del model
        gc.collect()
    return out


def measure(moe_dir: Path, experts: Mapping[str, Path], *, seed: Path | None, merge_weights: Mapping[str, float],
            heldout: Mapping[str, torch.Tensor], tokens: int, batch_size: int = 8, precision: str = "fp32",
            settings: Mapping | None = None) -> dict:
    """The merge-cost report of a mixed model: weight distances (with the `seed` the experts were
    branched from) and, on the first blocks of each domain's `heldout` sample making at least
    `tokens` tokens, the three losses. `settings`: the levers it was made with, for the record."""
    report: dict = {"settings": dict(settings or {}), "merge_weights": dict(merge_weights)}
    if seed is not None:
        report["distances"] = weight_distances(seed, experts, merge_weights)
    sample = {d: blocks[:max(1, -(-tokens // blocks.shape[1]))] for d, blocks in heldout.items()
              if d in experts and len(blocks)}
    if tokens > 0 and sample:
        report["tokens_per_domain"] = {d: int(b.numel()) for d, b in sample.items()}
        report["losses"] = oracle_losses(moe_dir, experts, sample, batch_size=batch_size, precision=precision)
    return report


# --- the report as text ----------------------------------------------------------------------------

def summary(report: Mapping) -> dict[str, float]:
    """Means over domains: expert, oracle, mix, and the two costs (oracle - expert: the merge;
    mix - oracle: the routers)."""
    losses = report.get("losses") or {}
    if not losses:
        return {}
    mean = {k: float(np.mean([v[k] for v in losses.values()])) for k in ("expert", "oracle", "mix")}
    return {**mean, "merge": mean["oracle"] - mean["expert"], "routing": mean["mix"] - mean["oracle"]}


def markdown(report: Mapping) -> str:
    """Two tables: each domain's three losses and the two costs; each kind's weight distances."""
    lines = [levers(report.get("settings") or {}), ""] if report.get("settings") else []
    if losses := report.get("losses"):
        tokens = sorted(set((report.get("tokens_per_domain") or {}).values()))
        lines += [f"Held-out loss, nats/token ({'/'.join(map(str, tokens))} tokens per domain): the expert alone, "
                  "the mixed model routed to that expert alone (oracle), and as its routers route.", "",
                  "| domain | expert alone | MoE, oracle-routed | MoE as routed | merge cost (oracle - expert) "
                  "| router cost (routed - oracle) |", "|---|---|---|---|---|---|"]
        rows = [(d, v) for d, v in losses.items()] + [("**mean**", summary(report))]
        for domain, v in rows:
            lines.append(f"| {domain} | {v['expert']:.4f} | {v['oracle']:.4f} | {v['mix']:.4f} "
                         f"| {v['oracle'] - v['expert']:+.4f} | {v['mix'] - v['oracle']:+.4f} |")
        lines.append("")
    if distances := report.get("distances"):
        lines += distance_table(distances)
    return "\n".join(lines)


def across_seeds_markdown(reports: Mapping[object, Mapping | None]) -> str:
    """Mean ± std over random seeds (`btx compare`): each domain's three losses and two costs,
    and each kind's distance from the seed and merged distance (mean over experts)."""
    reports = {seed: r for seed, r in reports.items() if r and r.get("losses")}
    if not reports:
        return ""

    def cell(values: list[float], sign: str = "") -> str:
        spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
        return f"{np.mean(values):{sign}.3f}{spread}"

    domains = list(next(iter(reports.values()))["losses"])
    lines = [f"Held-out loss, nats/token, mean ± std over seeds {', '.join(map(str, reports))}: the expert alone, "
             "the MiX routed to that expert alone (oracle) and as its untrained routers route.", "",
             "| domain | expert alone | MiX, oracle-routed | MiX as routed | merge cost | router cost |",
             "|---|---|---|---|---|---|"]
    for d in domains:
        rows = [r["losses"][d] for r in reports.values()]
        lines.append(f"| {d} | {cell([v['expert'] for v in rows])} | {cell([v['oracle'] for v in rows])} "
                     f"| {cell([v['mix'] for v in rows])} | {cell([v['oracle'] - v['expert'] for v in rows], '+')} "
                     f"| {cell([v['mix'] - v['oracle'] for v in rows], '+')} |")
    kinds = [r["distances"]["kinds"] for r in reports.values() if r.get("distances")]
    if kinds:
        lines += ["", "| kind | distance from the seed (mean over experts) | merged weights from an expert (mean) |",
                  "|---|---|---|"]
        for kind in kinds[0]:
            moved = [np.mean(list(k[kind]["distance"].values())) for k in kinds]
            merged = [np.mean(list(k[kind]["merged_distance"].values())) for k in kinds
                      if k[kind].get("merged_distance")]
            lines.append(f"| {kind} | {cell(moved)} | {cell(merged) if merged else 'kept per expert'} |")
    return "\n".join(lines) + "\n"


FINETUNE_LEVERS = ("router_warmup_steps", "router_lr")


def finetune_levers(values: Mapping) -> dict:
    """The finetune's router levers among `values` (a finetune config section or its stage's
    metrics), keyed as config lines."""
    return {f"finetune.{k}": values[k] for k in FINETUNE_LEVERS if values.get(k) is not None}


def levers(settings: Mapping) -> str:
    """The config lines a merge was made with, as YAML writes them."""
    return "Made with " + ", ".join(f"`{k}: {json.dumps(v).strip(chr(34))}`" for k, v in settings.items()) + "."


def distance_table(distances: Mapping) -> list[str]:
    names = distances["experts"]
    lines = ["Weights: each expert's distance from the seed, ||expert - seed|| / ||seed||; the merged weights' "
             "distance from each expert on the same scale; the cosine of the experts' updates (expert - seed), "
             "lowest and highest pair. FFNs are kept per expert (listed for scale).", "",
             "| kind | parameters | " + " | ".join(f"{n}: from seed" for n in names) + " | "
             + " | ".join(f"merged from {n}" for n in names) + " | update cosine (min..max) |",
             "|---|---|" + "---|" * (2 * len(names) + 1)]
    for kind, k in distances["kinds"].items():
        merged = k.get("merged_distance")
        cosines = [c for c in k["cosine"].values() if c is not None]
        spread = f"{min(cosines):.3f}..{max(cosines):.3f}" if cosines else "–"
        lines.append(f"| {kind} | {k['params']:,} | " + " | ".join(f"{k['distance'][n]:.4f}" for n in names) + " | "
                     + " | ".join(f"{merged[n]:.4f}" if merged else "kept" for n in names) + f" | {spread} |")
    return [*lines, ""]


def notes(report: Mapping) -> list[str]:
    """One line each for a command's output: the mean costs, and the largest merge distance."""
    out = []
    if s := summary(report):
        out.append(f"merge cost (held-out loss, mean over domains): expert alone {s['expert']:.4f}, MoE routed to "
                   f"its expert {s['oracle']:.4f} ({s['merge']:+.4f} from the merged shared weights), as routed "
                   f"{s['mix']:.4f} ({s['routing']:+.4f} from the routers)")
    for kind, k in ((report.get("distances") or {}).get("kinds") or {}).items():
        if merged := k.get("merged_distance"):
            moved = ", ".join(f"{n} {d:.4f}" for n, d in k["distance"].items())
            out.append(f"{kind}: distance from the seed {moved}; merged weights up to {max(merged.values()):.4f} "
                       "from an expert")
    return out
