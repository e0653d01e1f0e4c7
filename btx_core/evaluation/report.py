"""The comparison's results: per-seed rows aggregated over seeds (mean, spread), a markdown table
shaped like the BTX paper's Table 2 (held-out loss per domain instead of benchmarks, plus the
average, the mixed-domain set and the compute), the paper's claims checked seed by seed, and
the routing shares as CSV. Pure functions of the rows: nothing here trains or evaluates."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from btx_core.training.compute import human_flops

# Row names: what each baseline is, in the order of the table.
LABELS = {
    "seed": "Seed (dense, no further training)",
    "dense-tokens": "Dense: seed trained on the mixture, token-matched",
    "dense-flops": "Dense: seed trained on the mixture, FLOP-matched",
    "dense-time": "Dense: seed trained on the mixture, device-time-matched",
    "upcycle-tokens": "Sparse upcycling, token-matched",
    "upcycle-flops": "Sparse upcycling, FLOP-matched",
    "upcycle-time": "Sparse upcycling, device-time-matched",
    "btx-mix": "BTX before MoE-finetuning (MiX only)",
    "btx": "**BTX** (MiX + MoE-finetune)",
}


def row_label(name: str) -> str:
    if name.startswith("expert:"):
        return f"Expert {name.split(':', 1)[1]}"
    if name.startswith("btm-top"):
        return f"BTM ensemble, top-{name.removeprefix('btm-top')}"
    return LABELS.get(name, name)


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def aggregate(runs: Mapping[int, Mapping[str, Mapping]], domains: list[str]) -> dict:
    """runs: seed -> row name -> {single: {domain: loss}, average, mixed, tokens, flops, wall_s,
    device_s}."""
    names = list(dict.fromkeys(n for rows in runs.values() for n in rows))
    out = {}
    for name in names:
        rows = [rows[name] for rows in runs.values() if name in rows]
        metrics = {f"loss:{d}": [r.get("single", {}).get(d) for r in rows] for d in domains}
        metrics |= {f"mixed:{d}": [r.get("mixed_by_domain", {}).get(d) for r in rows] for d in domains}
        for key in ("average", "mixed", "tokens", "flops", "wall_s", "device_s"):
            metrics[key] = [r.get(key) for r in rows]
        out[name] = {k: _stats(v) for k, v in metrics.items()}
    return out


def _cell(stats: Mapping, digits: int = 3) -> str:
    if stats["mean"] is None:
        return "–"
    if stats["n"] > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def markdown_table(summary: Mapping, domains: list[str], seeds: Sequence[int]) -> str:
    """Table 2, small: held-out loss (nats/token, lower is better), mean ± std over seeds."""
    head = ["Model", *domains, "Average", "Mixed-domain", "Train tokens", "Train FLOPs", "Device time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary.items():
        cells = [row_label(name), *(_cell(s[f"loss:{d}"]) for d in domains), _cell(s["average"]),
                 _cell(s["mixed"])]
        # Rows from before device time was recorded fall back to wall time (one device).
        tokens, flops = s["tokens"]["mean"], s["flops"]["mean"]
        wall = s.get("device_s", {}).get("mean") or s["wall_s"]["mean"]
        cells += [f"{tokens / 1e6:.2f}M" if tokens else "0", human_flops(flops or 0),
                  f"{wall:.0f}" if wall else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Held-out loss in nats per token (lower is better), mean ± sample std over seeds "
            f"{', '.join(map(str, seeds))}. Training cost counts what each model trained after the "
            "shared seed; BTM and MiX cost their experts' training. Device time: each training stage's "
            "wall time x the devices it ran on, measured in this run (the paper's GPU-days).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def mixed_table(summary: Mapping, domains: list[str]) -> str:
    """Loss on each domain's segments of the mixed-domain blocks (context from other domains)."""
    head = ["Model", *(f"{d} segments" for d in domains), "All tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary.items():
        lines.append("| " + " | ".join([row_label(name), *(_cell(s[f"mixed:{d}"]) for d in domains),
                                        _cell(s["mixed"])]) + " |")
    return "\n".join(lines) + "\n"


# --- the paper's claims, checked per seed -------------------------------------------------------

def claims(runs: Mapping[int, Mapping[str, Mapping]], domains: list[str]) -> list[dict]:
    """Each claim as a per-seed difference (a - b, in nats; negative means a is better)."""
    checks: list[tuple[str, str, str, str]] = []  # (claim, a, b, metric)
    for d in domains:
        checks.append((f"expert {d} beats the seed on {d}", f"expert:{d}", "seed", f"loss:{d}"))
    for d in domains:
        checks.append((f"BTX beats the seed on {d}", "btx", "seed", f"loss:{d}"))
    for metric, where in (("average", "average over domains"), ("mixed", "mixed-domain set")):
        for other in ("upcycle-flops", "upcycle-tokens", "upcycle-time", "dense-flops", "dense-tokens",
                      "dense-time",
                      *sorted(n for n in next(iter(runs.values())) if n.startswith("btm-top"))):
            checks.append((f"BTX beats {row_label(other)} ({where})", "btx", other, metric))
    for d in domains:
        checks.append((f"BTX beats expert {d} on {d}", "btx", f"expert:{d}", f"loss:{d}"))
    for d in domains:  # the same, on each domain's segments of the mixed-domain blocks
        checks.append((f"expert {d} beats the seed on {d} segments (mixed set)", f"expert:{d}", "seed", f"mixed:{d}"))
        checks.append((f"BTX beats the seed on {d} segments (mixed set)", "btx", "seed", f"mixed:{d}"))
        checks.append((f"BTX beats expert {d} on {d} segments (mixed set)", "btx", f"expert:{d}", f"mixed:{d}"))
    out = []
    for text, a, b, metric in checks:
        diffs = [_metric(rows, a, metric) - _metric(rows, b, metric) for rows in runs.values()
                 if a in rows and b in rows and _metric(rows, a, metric) is not None
                 and _metric(rows, b, metric) is not None]
        if diffs:
            out.append({"claim": text, "a": a, "b": b, "metric": metric, "diffs": diffs,
                        **{k: v for k, v in _stats(diffs).items() if k != "n"},
                        "holds_in": sum(x < 0 for x in diffs), "seeds": len(diffs)})
    return out


def _metric(rows: Mapping, name: str, metric: str) -> float | None:
    row = rows[name]
    if metric.startswith("loss:"):
        return row.get("single", {}).get(metric[5:])
    if metric.startswith("mixed:"):
        return row.get("mixed_by_domain", {}).get(metric[6:])
    return row.get(metric)


def claims_markdown(items: list[dict]) -> str:
    lines = ["| Claim | a - b (nats), mean ± std | Holds (a < b) in |", "|---|---|---|"]
    for c in items:
        spread = f" ± {c['std']:.3f}" if c["seeds"] > 1 else ""
        lines.append(f"| {c['claim']} | {c['mean']:+.3f}{spread} | {c['holds_in']}/{c['seeds']} seeds |")
    return "\n".join(lines) + "\n"


# --- routing shares as CSV (the heatmaps: btx_core.evaluation.plots) ---------------------------------

def routing_csv(routing: Mapping, key: str = "by_domain_top1") -> str:
    """domain,layer,<expert...> rows of the shares in `key`."""
    lines = ["domain,layer," + ",".join(routing["experts"])]
    for domain, shares in routing[key].items():
        for layer, row in enumerate(shares):
            lines.append(f"{domain},{layer}," + ",".join(f"{x:.4f}" for x in row))
    return "\n".join(lines) + "\n"


# --- routing per domain, by layer group: where each domain's tokens go first ------------------------

def layer_groups(layers: int, groups: int = 4) -> list[range]:
    """`layers` split into at most `groups` runs of consecutive layers, as even as they come."""
    if layers < 1 or groups < 1:
        raise ValueError(f"routing: {layers} layers cannot be split into {groups} groups")
    return [range(int(part[0]), int(part[-1]) + 1) for part in np.array_split(np.arange(layers), min(groups, layers))]


def group_label(group: range) -> str:
    return f"layer {group[0]}" if len(group) == 1 else f"layers {group[0]}-{group[-1]}"


def routing_by_group(routing: Mapping, key: str = "by_domain_top1", groups: int = 4) -> dict[str, list[list[float]]]:
    """Layer-group label -> [domain][expert]: the share of each domain's tokens (top-1: whose
    first expert it is) routed to each expert, averaged over the group's layers (every layer
    routes the same tokens, so the mean is the group's share). Domains in `routing[key]`'s order."""
    shares = {d: np.asarray(layers, dtype=float) for d, layers in routing[key].items()}
    if not shares:
        raise ValueError(f"routing has no domains under {key!r}")
    depth = {grid.shape for grid in shares.values()}
    if len(depth) != 1 or len(next(iter(depth))) != 2 or next(iter(depth))[1] != len(routing["experts"]):
        raise ValueError(f"routing: {key} must be [layer][expert] for every domain, with "
                         f"{len(routing['experts'])} experts; got shapes {sorted(depth)}")
    layers = next(iter(depth))[0]
    return {group_label(g): [grid[g.start:g.stop].mean(axis=0).tolist() for grid in shares.values()]
            for g in layer_groups(layers, groups)}


def routing_groups_markdown(routing: Mapping, key: str = "by_domain_top1", groups: int = 4) -> str:
    """One table per layer group: a row per domain, a column per expert, the share of the
    domain's tokens whose top-1 expert that is."""
    experts, domains = list(routing["experts"]), list(routing[key])
    out = []
    for label, grid in routing_by_group(routing, key, groups).items():
        out += [f"**{label.capitalize()}**", "", "| Domain | " + " | ".join(experts) + " |",
                "|---" * (len(experts) + 1) + "|"]
        out += [f"| {d} | " + " | ".join(f"{x:.0%}" for x in row) + " |" for d, row in zip(domains, grid)]
        out.append("")
    return "\n".join(out)


# --- routing per layer, summarised: specialisation and the least-used expert ------------------------

def routing_summary(routing: Mapping) -> dict:
    """Per layer of an MoE on one set: the share of each domain's tokens whose top-1 expert is that
    domain's own expert (where the MoE has one by that name) and the least-used expert's share of
    the routed slots (uniform: 1/experts; near 0: an expert the router has dropped)."""
    experts, load = list(routing["experts"]), np.asarray(routing["load"], dtype=float)
    own = {d: [float(layer[experts.index(d)]) for layer in shares]
           for d, shares in routing["by_domain_top1"].items() if d in experts}
    low = load.argmin(axis=1)
    least = [(experts[i], float(load[layer, i])) for layer, i in enumerate(low)]
    return {"own_top1": own, "least_used": least, "uniform": 1.0 / len(experts)}


def routing_layers_markdown(routing: Mapping) -> str:
    """One row per layer: each domain's tokens sent (top-1) to its own expert, and the least-used
    expert with its share of the routed slots."""
    summary = routing_summary(routing)
    domains = list(summary["own_top1"])
    head = "| Layer | " + " | ".join(f"{d} tokens -> expert {d}" for d in domains) + " | Least-used expert |"
    lines = [head, "|---" * (len(domains) + 2) + "|"]
    for layer, (name, share) in enumerate(summary["least_used"]):
        own = " | ".join(f"{summary['own_top1'][d][layer]:.0%}" for d in domains)
        lines.append(f"| {layer} | {own} | {name} {share:.1%} |")
    return "\n".join(lines) + ("\n\nOwn expert: share of the domain's tokens whose top-1 expert it is. "
                              "Least-used: that expert's share of all routed slots (top-k) in the layer; "
                              f"a uniform router gives every expert {summary['uniform']:.0%}.\n")
