"""Figures of a run's results as PNG bytes: routing heatmaps (one renderer for the MiX stage's
load, layers x experts; the comparison's per-domain shares, layers x experts per domain; and a
run's per-domain shares, domains x experts per layer group) and training-loss curves.
matplotlib is imported lazily, with the Agg backend: nothing here needs a display."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from btx_core.evaluation.report import routing_by_group

DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, dpi: int) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def heatmap_png(panels: Mapping[str, Sequence[Sequence[float]]], *, columns: Sequence[str],
                rows: Sequence[str], title: str, vmax: float | None = None, dpi: int = DPI) -> bytes:
    """One panel per entry, headed by its name (none for ""): `rows` x `columns` cells, each
    coloured (viridis, 0 to `vmax`, by default the largest value) and labelled with its value."""
    plt = _pyplot()
    grids = {name: [[float(x) for x in row] for row in grid] for name, grid in panels.items()}
    top = vmax if vmax is not None else max(max(row) for grid in grids.values() for row in grid) or 1.0
    fig, axes = plt.subplots(1, len(grids), squeeze=False,
                             figsize=(0.3 + len(grids) * (0.9 + 0.55 * len(columns)), max(3.2, 0.9 + 0.42 * len(rows))))
    for i, (ax, (name, grid)) in enumerate(zip(axes[0], grids.items())):
        image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
        if name:
            ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows if i == 0 else [], fontsize=8)  # the panels share their rows
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * top else "black")
    fig.suptitle(title, fontsize=10, y=1.0 + 0.25 / fig.get_figheight())  # above the panels' titles
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.04, pad=0.03)
    return _png(fig, dpi)


def check_routing(routing: Mapping) -> tuple[list[str], list[float], list[list[float]]]:
    """The MiX stage's routing report, checked: `experts` [E names], `entropy` [L floats],
    `load` [L][E] fractions of tokens per layer and expert."""
    try:
        experts, entropy, load = list(routing["experts"]), list(routing["entropy"]), routing["load"]
    except (KeyError, TypeError):
        raise ValueError("routing must have `experts`, `entropy` and `load`") from None
    load = [[float(x) for x in row] for row in load]
    if not experts or not load:
        raise ValueError("routing has no experts or no layers")
    if len(entropy) != len(load):
        raise ValueError(f"routing: {len(entropy)} entropy values for {len(load)} layers of load")
    for i, row in enumerate(load):
        if len(row) != len(experts):
            raise ValueError(f"routing: layer {i} has {len(row)} load values for {len(experts)} experts")
        if any(not math.isfinite(x) or x < 0 for x in row):
            raise ValueError(f"routing: layer {i} has a load that is negative or not finite")
    return [str(e) for e in experts], [float(h) for h in entropy], load


def routing_load_png(routing: Mapping, *, title: str = "routing: share of tokens per expert",
                     dpi: int = DPI) -> bytes:
    """The MiX stage's routing report (see `check_routing`): layers x experts, the share of all
    tokens routed to each expert, each layer's routing entropy beside its row."""
    experts, entropy, load = check_routing(routing)
    return heatmap_png({"": load}, columns=experts, rows=[f"layer {i}  H={h:.2f}" for i, h in enumerate(entropy)],
                       title=title, dpi=dpi)


def routing_heatmap(routing: Mapping, path: Path, *, title: str, key: str = "by_domain_top1") -> Path:
    """One panel per domain: layers x experts, the share of the domain's tokens routed to each
    expert (`key`: top-1 or top-k), on one scale from 0 to 1; as a PNG file at `path`."""
    by_domain = routing[key]
    layers = len(next(iter(by_domain.values())))
    png = heatmap_png(by_domain, columns=routing["experts"], rows=[f"L{i}" for i in range(layers)],
                      title=title, vmax=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def routing_by_domain_png(routing: Mapping, *, title: str, key: str = "by_domain_top1", groups: int = 4,
                          dpi: int = DPI) -> bytes:
    """One panel per layer group (`report.routing_by_group`): domains x experts, the share of
    each domain's tokens whose top-1 expert is that one, on one scale from 0 to 1."""
    return heatmap_png(routing_by_group(routing, key, groups), columns=[str(e) for e in routing["experts"]],
                       rows=list(routing[key]), title=title, vmax=1.0, dpi=dpi)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (the raw per-step loss of small batches is noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves_png(curves: Mapping[str, Sequence[float]], *, title: str = "training loss",
                    dpi: int = DPI) -> bytes:
    """One line per stage (per-step training loss, lightly smoothed)."""
    curves = {name: [float(v) for v in values] for name, values in curves.items() if values}
    if not curves:
        raise ValueError("no loss curves to plot: the manifests hold no `train_losses`")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        window = max(1, len(values) // 50)
        ax.plot(range(1, len(values) + 1), _smooth(values, window), label=name, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig, dpi)
