"""What a model card says about how the run made its model: the seed's lineage (a Hub id for
`base_model` when there is one, the store locations for `btx:`) and the recipe, one row per
training stage before the card's own: data, optimizer steps, training tokens, peak lr."""

from __future__ import annotations

from pathlib import Path

from btx_core.config.schema import BTXConfig
from btx_core.errors import IncompleteOutputError
from btx_core.model.card import seed_lineage
from btx_core.store import layout
from btx_core.store.core import Manifest, Store


def lineage(config: BTXConfig, seed: Manifest, seed_dir: Path | None = None) -> dict:
    """`seed_lineage` of the run's seed (its manifest records where it came from and whether that
    was a Hub download); `seed_dir`: a local copy, whose own card may name a base_model."""
    return seed_lineage(seed_dir, seed.extra.get("source") or layout.seed_model(config.run_root), seed.extra.get("hub_id"))


def recipe(config: BTXConfig, store: Store, *, experts: bool = True) -> list[dict]:
    """The seed (imported, or pretrained on the general corpus) and each domain's expert, as their
    manifests recorded them; a stage without a complete output is left out."""
    def metrics(location: str) -> dict | None:
        try:
            return store.read_manifest(location).metrics
        except IncompleteOutputError:
            return None

    rows = []
    if (seed := metrics(layout.seed_model(config.run_root))) is not None:
        if config.seed.model is not None:
            rows.append({"stage": "seed", "data": "imported, not trained by btx"})
        else:
            rows.append({"stage": "seed (pretrained)", "data": "general", "steps": seed.get("steps"),
                         "tokens": seed.get("tokens"), "lr": config.seed.pretrain.lr})
    for d in config.domains if experts else ():
        if (m := metrics(layout.expert_model(config.run_root, d.name))) is not None:
            train = f" ({config.branch.train} trained)" if config.branch.train != "all" else ""
            rows.append({"stage": f"expert {d.name}", "data": d.name + train, "steps": m.get("steps"),
                         "tokens": m.get("tokens"), "lr": config.expert_training.lr})
    return rows
