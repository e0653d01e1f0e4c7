"""`btx`: the command line. The only place that prints for humans and exits with a status."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from btx_core.errors import BTXError, ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Branch-Train-MiX: one seed LLM -> N domain experts -> one Mixture-of-Experts LLM.")

ConfigArg = typer.Argument(..., help="Pipeline config (YAML), e.g. configs/demo.yaml")


def main() -> None:
    logging.basicConfig(level=os.environ.get("BTX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "botocore", "s3fs", "fsspec", "urllib3", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except ConfigError as exc:
        typer.secho(f"error: invalid config: {exc}", err=True, fg="red")
        sys.exit(2)
    except BTXError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under torchrun, leave the process group cleanly (NCCL warns about leaked groups)."""
    dist = sys.modules.get("torch.distributed")  # not imported by validate/status: keep them fast
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _load(config_path: Path):
    from btx_core.validation import load_config

    return load_config(config_path)


class _ProgressBar:
    """tqdm bar fed by the training loop's progress callback."""

    def __init__(self, description: str):
        self.description, self.bar = description, None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.total_steps, initial=p.resumed_from, desc=self.description,
                            unit="step", dynamic_ncols=True)
            if p.resumed_from:
                self.bar.write(f"{self.description}: resumed from step {p.resumed_from}")
        self.bar.update(p.step - self.bar.n)
        self.bar.set_postfix(loss=f"{p.loss:.3f}", tok_s=f"{p.tokens_per_s:,.0f}", eta=f"{p.eta_s:,.0f}s")

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.bar is not None:
            self.bar.close()
        if kind is KeyboardInterrupt:  # typer would exit 130 without a word
            typer.secho("interrupted: run the same command again to resume from the newest "
                        "checkpoint", err=True, fg="yellow")
            raise typer.Exit(130)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all


def _report(title: str, output) -> None:
    state = "already complete (same config and inputs): nothing to do" if output.skipped else "done"
    typer.echo(f"{title}: {state}\n  location: {output.location}\n  manifest: {output.manifest.hash[:16]}")
    for note in output.notes:
        typer.echo(f"  {note}")


@app.command()
def validate(config: Path = ConfigArg) -> None:
    """Check a config (fields, paths, store scheme, seed architecture) without doing any work."""
    cfg = _load(config)
    domains = ", ".join(d.name for d in cfg.domains)
    typer.echo(f"{config}: valid. run {cfg.run_name!r}, store {cfg.store}, domains: {domains}")


@app.command()
def seed(config: Path = ConfigArg) -> None:
    """Import the seed model into the store, or create and pretrain the tiny demo seed."""
    from btx_core.stages import build_seed

    cfg = _load(config)
    with _ProgressBar("seed") as bar:
        out = build_seed(cfg, on_progress=bar)
    if not _is_main_process():
        return
    _report("seed", out)
    if "heldout_loss" in out.metrics:
        typer.echo(f"  held-out loss (general): {out.metrics['heldout_loss']:.4f}")


@app.command("train-expert")
def train_expert(config: Path = ConfigArg,
                 domain: str = typer.Option(..., "--domain", "-d", help="Domain to train, from `domains`")) -> None:
    """Branch the seed and train one domain expert (resumes from its newest checkpoint)."""
    from btx_core.stages import train_expert as run

    cfg = _load(config)
    cfg.domain(domain)
    with _ProgressBar(f"expert[{domain}]") as bar:
        out = run(cfg, domain, on_progress=bar)
    if not _is_main_process():
        return
    _report(f"expert[{domain}]", out)
    m = out.metrics
    typer.echo(f"  held-out {domain} loss: seed {m['seed_heldout_loss']:.4f} -> expert "
               f"{m['heldout_loss']:.4f} ({m['heldout_loss'] - m['seed_heldout_loss']:+.4f} nats/token)")


@app.command()
def status(config: Path = ConfigArg) -> None:
    """Show which stages of a run are complete in the store."""
    from btx_core import layout
    from btx_core.stages import open_store

    cfg = _load(config)
    store = open_store(cfg)
    rows = [("seed", layout.seed_model(cfg), layout.seed_checkpoints(cfg))]
    rows += [(f"expert[{d.name}]", layout.expert_model(cfg, d.name), layout.expert_checkpoints(cfg, d.name))
             for d in cfg.domains]
    for name, location, checkpoints in rows:
        if store.is_complete(location):
            state = "complete"
        else:
            latest = store.latest_checkpoint(checkpoints)
            state = f"in progress (checkpoint at step {latest[0]})" if latest else "not started"
        typer.echo(f"{name:<24} {state:<40} {location}")


if __name__ == "__main__":
    main()
