"""Figures for the Prefect UI, as PNG data URIs to embed in markdown artifacts (the UI renders
`![...](data:image/png;base64,...)`). matplotlib is imported lazily, with the Agg backend."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

DPI = 90  # the images live in the Prefect database: keep them tens of kB


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _data_uri(fig) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (the raw per-step loss of small batches is noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves_png(curves: Mapping[str, Sequence[float]], *, title: str = "training loss") -> str:
    """One line per stage (per-step training loss, lightly smoothed); a PNG data URI."""
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
    return _data_uri(fig)


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


def routing_heatmap_png(routing: Mapping, *, title: str = "routing: share of tokens per expert") -> str:
    """Layers x experts heatmap of the routing load, the per-layer routing entropy beside each
    row; a PNG data URI."""
    experts, entropy, load = check_routing(routing)
    plt = _pyplot()
    layers = len(load)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(experts), 0.9 + 0.42 * layers))
    top = max(max(row) for row in load) or 1.0
    image = ax.imshow(load, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    ax.set_xticks(range(len(experts)), experts, rotation=30, ha="right")
    ax.set_yticks(range(layers), [f"layer {i}  H={h:.2f}" for i, h in enumerate(entropy)])
    for i, row in enumerate(load):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 0.6 * top else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _data_uri(fig)
