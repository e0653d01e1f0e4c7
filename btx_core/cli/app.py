"""The `btx` Typer app and what its commands share: loading a config, reporting a stage's output.
Commands register on `app` from their own modules (pipeline, fetch, mix, after_mix); `main` runs it."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from btx_core.logs import quiet_model_loads

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Branch-Train-MiX: one seed LLM -> N domain experts -> one Mixture-of-Experts LLM.")

ConfigArg = typer.Argument(..., help="Pipeline config (YAML), e.g. configs/demo.yaml")


def _print_version(value: bool) -> None:
    if value:
        from btx_core import __version__

        typer.echo(f"btx {__version__}")
        raise typer.Exit()


def _verbose(value: bool) -> None:
    if value:  # in the environment, so the branch processes and stage runs it starts log alike
        import logging

        from btx_core.logs import show_everything

        os.environ["BTX_LOG_LEVEL"] = "DEBUG"
        show_everything(logging.DEBUG)


@app.callback()
def _options(show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                               help="Print btx's version and exit"),
             verbose: bool = typer.Option(False, "--verbose", "-v", callback=_verbose, is_eager=True,
                                          help="Debug logs, the libraries' request lines included "
                                               "(the same as BTX_LOG_LEVEL=DEBUG)")) -> None:
    """Branch-Train-MiX: one seed LLM -> N domain experts -> one Mixture-of-Experts LLM."""


def load(config_path: Path, *, loads_models: bool = True):
    """The validated config; every problem is reported at once, before any heavy import. A command
    that loads models (`loads_models`) also turns transformers' per-model bars off."""
    from btx_core.config.load import load_config

    cfg = load_config(config_path)
    if loads_models:
        quiet_model_loads()
    return cfg


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all


def report(title: str, output) -> None:
    state = "already complete (same config and inputs): nothing to do" if output.skipped else "done"
    typer.echo(f"{title}: {state}\n  location: {output.location}\n  manifest: {output.manifest.hash[:16]}")
    for note in output.notes:
        typer.echo(f"  {note}")
