"""`btx finetune`, `btx eval`, `btx compare`: the commands after MiX (registered on `btx`'s app)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from btx_core.cli.app import ConfigArg, app, is_main_process, load, report
from btx_core.cli.progress import ProgressBar


@app.command("finetune")
def finetune_command(
        config: Path = ConfigArg,
        kind: str = typer.Option("btx", "--kind", help="btx (the MiX output), upcycle (the MoE of seed "
                                 "copies) or dense (the seed itself)"),
        steps: int = typer.Option(None, "--steps", help="Override finetune.training's budget"),
        name: str = typer.Option(None, "--name", help="Output name under <run>/trained/ (default: KIND)")) -> None:
    """MoE-finetune the mixed model on the mixture of all domains plus the general corpus
    (resumes from its newest checkpoint; skips when already done)."""
    from btx_core.stages.finetune import finetune

    cfg = load(config)
    with ProgressBar(f"finetune[{name or kind}]") as bar:
        out = finetune(cfg, kind, steps=steps, name=name, on_progress=bar)
    if not is_main_process():
        return
    report(f"finetune[{name or kind}]", out)
    m = out.metrics
    typer.echo(f"  held-out loss (mixture): {m['start_heldout_loss']:.4f} -> {m['heldout_loss']:.4f}")


@app.command("eval")
def eval_command(
        config: Path = ConfigArg,
        model: str = typer.Option(..., "--model", help="A model: store location (e.g. "
                                  "./store/demo/trained/btx/model) or a local HF directory"),
        out: Path = typer.Option(None, "--out", help="Write the full result (with routing) as JSON here")) -> None:
    """Held-out loss and perplexity of one model on each domain and on the mixed-domain set."""
    import math

    from btx_core.stages.evaluate import evaluate_location

    cfg = load(config)
    result = evaluate_location(cfg, model)
    typer.echo(f"{model}\n  {'set':<16} {'loss':>8} {'ppl':>10}")
    rows = [*result["single"].items(), ("average", result["average"])]
    rows += [("mixed-domain", result["mixed"])] if "mixed" in result else []
    for name, loss in rows:
        typer.echo(f"  {name:<16} {loss:8.4f} {math.exp(loss):10.2f}")
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
        typer.echo(f"  written: {out}")


def _stage_printer():
    import time

    started = time.perf_counter()

    def stage(label: str) -> None:
        typer.echo(f"[{time.perf_counter() - started:7.0f} s] {label}")
    return stage


@app.command("compare")
def compare_command(
        config: Path = ConfigArg,
        out: Path = typer.Option(Path("results"), "--out", help="Local directory for the tables, JSON "
                                 "and heatmaps (also written to the store)"),
        seeds: str = typer.Option(None, "--seeds", help="Comma-separated random seeds instead of "
                                  "`compare.seeds`, e.g. 1 to train one seed per command; a later run "
                                  "over all of them reuses what each trained")) -> None:
    """BTX vs the seed, each expert, BTM, sparse upcycling and a dense baseline (compute-matched
    three ways), over `compare.seeds`; reuses every stage output already in the store."""
    from btx_core.stages.compare import compare

    cfg = load(config)
    if seeds is not None:
        cfg = cfg.model_copy(update={"compare": cfg.compare.model_copy(update={"seeds": _seeds(seeds)})})
    report = compare(cfg, out_dir=out, stage=_stage_printer())
    typer.echo((out / "results.md").read_text())
    typer.echo(f"compare: {report['wall_s']:.0f} s; results in {out}/ and {report['location']}")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"{text!r}: give distinct integer seeds separated by commas, e.g. 0,1",
                                 param_hint="--seeds")
    return seeds


@app.command("ablate")
def ablate_command(
        config: Path = ConfigArg,
        only: str = typer.Option(None, "--only", help="Comma-separated ablations (default: all; one the config already has is "
                                 "skipped): router-centroid, router-normal, no-load-balancing, "
                                 "transformers-load-balancing, seed-in-shared-mean, top-1, soft-routing, "
                                 "sample-top-1, router-warmup, router-lr"),
        out: Path = typer.Option(Path("results"), "--out", help="Local directory for ablations.md and "
                                 "ablations.json (also written to the store)")) -> None:
    """The paper's ablations at the config's own random seed, each one config line: the same seed
    and experts, MiX and MoE-finetune redone as the line changes them; reuses what the store has."""
    from btx_core.stages.ablate import ablate

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    report = ablate(load(config), only=names, out_dir=out, stage=_stage_printer())
    typer.echo((out / "ablations.md").read_text())
    typer.echo(f"ablate: {report['wall_s']:.0f} s; results in {out}/")
