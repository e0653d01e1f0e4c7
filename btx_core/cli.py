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
    cfg = _load(config)  # a bad config fails before the training stack is imported
    from btx_core.stages import build_seed

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
    cfg = _load(config)  # a bad config or domain fails before the training stack is imported
    cfg.domain(domain)
    from btx_core.stages import train_expert as run

    with _ProgressBar(f"expert[{domain}]") as bar:
        out = run(cfg, domain, on_progress=bar)
    if not _is_main_process():
        return
    _report(f"expert[{domain}]", out)
    m = out.metrics
    typer.echo(f"  held-out {domain} loss: seed {m['seed_heldout_loss']:.4f} -> expert "
               f"{m['heldout_loss']:.4f} ({m['heldout_loss'] - m['seed_heldout_loss']:+.4f} nats/token)")


class _StageBars:
    """One tqdm bar per training stage of a `btx run`, stacked in the order stages start.
    Branches call it from their own threads."""

    def __init__(self):
        import threading

        self.bars: list[_ProgressBar] = []
        self.lock = threading.Lock()

    def __call__(self, label: str):
        from tqdm import tqdm

        with self.lock:
            bar = _ProgressBar(label)
            bar.position = len(self.bars)
            self.bars.append(bar)

        def show(p) -> None:
            with self.lock:
                if bar.bar is None:
                    bar.bar = tqdm(total=p.total_steps, initial=p.resumed_from, desc=label, unit="step",
                                   position=bar.position, dynamic_ncols=True, leave=True)
                    if p.resumed_from:
                        bar.bar.write(f"{label}: resumed from step {p.resumed_from}")
                bar(p)

        return show

    def close(self) -> None:
        for bar in self.bars:
            if bar.bar is not None:
                bar.bar.close()


@app.command()
def run(config: Path = ConfigArg) -> None:
    """Run the whole pipeline (seed -> experts in parallel -> ...) as the Prefect flow
    `btx-pipeline`: embedded (a temporary local Prefect API, no server to start) unless
    PREFECT_API_URL names a server. Finished stages are reused; failed branches resume."""
    cfg = _load(config)
    for name, value in (("DO_NOT_TRACK", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        os.environ.setdefault(name, value)
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as hf_logging

    from flows.pipeline import btx_pipeline
    from flows.progress import display

    hf_logging.disable_progress_bar()  # per-load bars would scroll the stage bars away
    bars = _StageBars()
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
    rows += [("mix", layout.mix_model(cfg), None), ("upcycle", layout.upcycle_model(cfg), None)]
    if cfg.finetune is not None:
        rows += [("finetune", layout.trained_model(cfg, "btx"), layout.trained_checkpoints(cfg, "btx")),
                 ("evaluate", layout.eval_results(cfg), None)]
    for name, location, checkpoints in rows:
        if store.is_complete(location):
            state = "complete"
        else:
            latest = checkpoints and store.latest_checkpoint(checkpoints)
            state = f"in progress (checkpoint at step {latest[0]})" if latest else "not started"
        typer.echo(f"{name:<24} {state:<40} {location}")


# --- MiX -------------------------------------------------------------------------------------------

_MIX_HELP = {
    "expert": "A dense expert directory (HF layout); repeat, in expert order",
    "name": "Names for the experts, in order (default: directory names)",
    "top_k": "Experts per token",
    "shared": "Merge of non-FFN tensors: mean, weighted or copy",
    "weight": "weighted: NAME=WEIGHT, repeat per expert",
    "copy_from": "copy: the expert (name, or index in flag order) whose non-FFN tensors are taken",
    "exclude": "An expert (name) whose non-FFN tensors stay out of the merge; repeatable",
    "router_init": "normal, zeros, uniform or centroid (centroid needs --data)",
    "data": "Text per expert, in expert order (file, dir or glob; '-' for a generalist), for the "
            "centroid init and the routing report",
    "seq_len": "Block length of the --data samples",
    "shard_size": "Largest output shard, e.g. 2GB",
    "dtype": "Output dtype (default: the experts')",
}


def _existing_dirs(flag: str, paths: list[Path]) -> None:
    for path in paths:
        if not path.expanduser().is_dir():
            raise BTXError(f"{flag} {path}: no such directory; give a Hugging Face model directory "
                           "(config.json and *.safetensors)")


def _option(default, help_key: str, *flags: str):
    return typer.Option(default, *flags, help=_MIX_HELP[help_key])


def _mix_options(top_k: int, shared: str, weight: list[str], copy_from: str | None, exclude: list[str],
                 router_init: str, shard_size: str, dtype: str | None):
    import torch

    from btx_core.config import parse_bytes
    from btx_core.mix import MixOptions

    weights = {}
    for item in weight:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise BTXError(f"--weight {item!r}: write NAME=WEIGHT, e.g. --weight math=0.5") from None
    torch_dtype = getattr(torch, dtype, None) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise BTXError(f"--dtype {dtype!r} is not a torch dtype: use bfloat16, float16 or float32")
    try:
        size = parse_bytes(shard_size)
    except ValueError as exc:
        raise BTXError(f"--shard-size: {exc}") from None
    return MixOptions(top_k=top_k, shared_policy=shared, weights=weights or None, copy_from=copy_from,
                      shared_exclude=tuple(exclude), router_init=router_init, shard_size=size,
                      dtype=torch_dtype)


@app.command("mix")
def mix_command(
        config: Path = typer.Argument(None, help="Pipeline config: mix the run's trained experts"),
        expert: list[Path] = _option([], "expert", "--expert", "-e"),
        out: str = typer.Option(None, "--out", "-o", help="Output directory or s3:// location (with --expert)"),
        name: list[str] = _option([], "name", "--name"),
        top_k: int = _option(2, "top_k", "--top-k"),
        shared: str = _option("mean", "shared", "--shared-policy"),
        weight: list[str] = _option([], "weight", "--weight"),
        copy_from: str = _option(None, "copy_from", "--copy-from"),
        exclude: list[str] = _option([], "exclude", "--exclude-from-merge"),
        router_init: str = _option("normal", "router_init", "--router-init"),
        data: list[str] = _option([], "data", "--data"),
        seq_len: int = _option(256, "seq_len", "--seq-len"),
        shard_size: str = _option("2GB", "shard_size", "--shard-size"),
        dtype: str = _option(None, "dtype", "--dtype")) -> None:
    """Mix dense experts into one Mixtral MoE: a run's experts (CONFIG), or any directories."""
    if (config is None) == (not expert):
        raise BTXError("give either CONFIG (mix a run's experts) or --expert DIR ... --out DIR")
    if config is not None:
        from btx_core.mix_stage import mix_stage

        _report("mix", mix_stage(_load(config)))
        return
    if not out:
        raise BTXError("--expert needs --out DIR (where the MoE is written)")
    _existing_dirs("--expert", expert)
    from btx_core.mix import experts_from_dirs
    from btx_core.mix_local import mix_dirs, samples_from_paths

    experts = experts_from_dirs(expert, name)
    names = [e.name for e in experts]
    if copy_from and copy_from.isdigit() and copy_from not in names and int(copy_from) < len(names):
        copy_from = names[int(copy_from)]  # an index, as mergekit users write it
    options = _mix_options(top_k, shared, weight, copy_from, exclude, router_init, shard_size, dtype)
    samples = samples_from_paths(experts, data, seq_len=seq_len, count=32) if data else None
    _report("mix", mix_dirs(experts, out, options, samples=samples))


@app.command()
def upcycle(config: Path = typer.Argument(None, help="Pipeline config: upcycle the run's seed"),
            model: Path = typer.Option(None, "--model", "-m", help="A dense model directory to upcycle"),
            experts: int = typer.Option(4, "--experts", "-n", help="Number of copies (with --model)"),
            out: str = typer.Option(None, "--out", "-o", help="Output directory (with --model)"),
            top_k: int = _option(2, "top_k", "--top-k"),
            router_init: str = _option("normal", "router_init", "--router-init"),
            shard_size: str = _option("2GB", "shard_size", "--shard-size")) -> None:
    """Sparse upcycling: an MoE of N copies of one dense model (the same code path as mix)."""
    if (config is None) == (model is None):
        raise BTXError("give either CONFIG (upcycle the run's seed) or --model DIR --out DIR")
    if config is not None:
        from btx_core.mix_stage import mix_stage

        _report("upcycle", mix_stage(_load(config), upcycle=True))
        return
    if not out:
        raise BTXError("--model needs --out DIR (where the MoE is written)")
    _existing_dirs("--model", [model])
    from btx_core.mix import experts_from_dirs
    from btx_core.mix_local import mix_dirs

    sources = experts_from_dirs([model] * experts, [f"copy{i}" for i in range(experts)])
    options = _mix_options(top_k, "mean", [], None, [], router_init, shard_size, None)
    _report("upcycle", mix_dirs(sources, out, options, stage="upcycle"))


moe_app = typer.Typer(no_args_is_help=True, help="Edit a mixed MoE.")
app.add_typer(moe_app, name="moe")


@moe_app.command("drop-expert")
def drop_expert(moe: str = typer.Argument(..., help="The MoE directory"),
                expert: str = typer.Option(..., "--expert", "-e", help="Expert to drop (name or index)"),
                out: str = typer.Option(..., "--out", "-o", help="Output directory")) -> None:
    """Write the MoE without one expert (its FFNs and router rows removed), as an opt-out."""
    from btx_core.mix_local import drop_expert_dir

    _report("drop-expert", drop_expert_dir(moe, expert, out))


from btx_core import cli_compare  # noqa: E402,F401  (registers finetune, eval, compare)

if __name__ == "__main__":
    # `python -m btx_core.cli`: run the importable module, whose app has every command registered.
    from btx_core.cli import main as _main

    _main()
