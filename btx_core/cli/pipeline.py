"""`btx validate`, `btx seed`, `btx train-expert`, `btx run`, `btx status`: the pipeline's commands,
from checking a config to running every stage as the Prefect flow `btx-pipeline`."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from btx_core.cli.app import ConfigArg, app, is_main_process, load, report
from btx_core.cli.progress import ProgressBar, StageBars


@app.command()
def validate(config: Path = ConfigArg) -> None:
    """Check a config (fields, paths, store scheme, seed architecture) without doing any work."""
    cfg = load(config, loads_models=False)
    domains = ", ".join(d.name for d in cfg.domains)
    typer.echo(f"{config}: valid. run {cfg.run_name!r}, store {cfg.store}, domains: {domains}")


@app.command()
def seed(config: Path = ConfigArg) -> None:
    """Import the seed model into the store, or create and pretrain the tiny demo seed."""
    cfg = load(config)  # a bad config fails before the training stack is imported
    from btx_core.stages.seed import build_seed

    with ProgressBar("seed") as bar:
        out = build_seed(cfg, on_progress=bar)
    if not is_main_process():
        return
    report("seed", out)
    if "heldout_loss" in out.metrics:
        typer.echo(f"  held-out loss (general): {out.metrics['heldout_loss']:.4f}")


@app.command("train-expert")
def train_expert(config: Path = ConfigArg,
                 domain: str = typer.Option(..., "--domain", "-d", help="Domain to train, from `domains`")) -> None:
    """Branch the seed and train one domain expert (resumes from its newest checkpoint)."""
    cfg = load(config)  # a bad config or domain fails before the training stack is imported
    cfg.domain(domain)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank under torchrun: it goes when torchrun goes
        from btx_core.training.stop import die_with_parent

        die_with_parent()
    from btx_core.stages.expert import train_expert as run

    with ProgressBar(f"expert[{domain}]") as bar:
        out = run(cfg, domain, on_progress=bar)
    if not is_main_process():
        return
    report(f"expert[{domain}]", out)
    m = out.metrics
    typer.echo(f"  held-out {domain} loss: seed {m['seed_heldout_loss']:.4f} -> expert "
               f"{m['heldout_loss']:.4f} ({m['heldout_loss'] - m['seed_heldout_loss']:+.4f} nats/token)")


@app.command()
def run(config: Path = ConfigArg) -> None:
    """Run the whole pipeline (seed -> experts in parallel -> ...) as the Prefect flow
    `btx-pipeline`: embedded (a temporary local Prefect API, no server to start) unless
    PREFECT_API_URL names a server. Finished stages are reused; failed branches resume."""
    cfg = load(config)
    for name, value in (("DO_NOT_TRACK", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        os.environ.setdefault(name, value)
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as hf_logging

    from flows.pipeline import btx_pipeline
    from flows.progress import display

    hf_logging.disable_progress_bar()  # per-load bars would scroll the stage bars away
    # SIGTERM: the flow stops its branches, each at a checkpoint, and this process ends; SIGKILL
    # or a crash: the reaper ends what this process started (branches, the temporary API server).
    from btx_core.cli import reaper

    reaper.start()
    bars = StageBars()
    try:
        with display(bars), logging_redirect_tqdm():
            state = btx_pipeline(cfg, return_state=True)
    except KeyboardInterrupt:
        bars.close()
        typer.secho("interrupted: run the same command again; finished stages are reused and "
                    "unfinished ones resume from their newest checkpoint", err=True, fg="yellow")
        raise typer.Exit(130)
    bars.close()
    if not state.is_completed():
        typer.secho(f"error: pipeline {state.type.value.lower()}: {state.message}\nrun the same "
                    "command again to retry: finished stages are reused", err=True, fg="red")
        raise typer.Exit(1)
    typer.echo(f"pipeline {cfg.run_name!r} complete; artifacts under the key prefix {cfg.run_name}-")
    status(config)
    from flows.report import terminal_summary

    typer.echo(terminal_summary(cfg))


@app.command()
def status(config: Path = ConfigArg) -> None:
    """Show which stages of a run are complete in the store."""
    from btx_core.stages.common import open_store
    from btx_core.store import layout

    cfg = load(config, loads_models=False)
    store = open_store(cfg)
    run = cfg.run_root
    rows = [("seed", layout.seed_model(run), layout.seed_checkpoints(run))]
    rows += [(f"expert[{d.name}]", layout.expert_model(run, d.name), layout.expert_checkpoints(run, d.name))
             for d in cfg.domains]
    rows += [("mix", layout.mix_model(run), None), ("upcycle", layout.upcycle_model(run), None)]
    if cfg.finetune is not None:
        rows += [("finetune", layout.trained_model(run, "btx"), layout.trained_checkpoints(run, "btx")),
                 ("evaluate", layout.eval_results(run), None)]
    for name, location, checkpoints in rows:
        if store.is_complete(location):
            state = "complete"
        else:
            latest = checkpoints and store.latest_checkpoint(checkpoints)
            state = f"in progress (checkpoint at step {latest[0]})" if latest else "not started"
        typer.echo(f"{name:<24} {state:<40} {location}")
