"""`btx mix`, `btx upcycle`, `btx moe drop-expert`: experts (or copies of one model) -> one MoE,
from a run's store or from any directories, and editing a mixed MoE."""

from __future__ import annotations

from pathlib import Path

import typer

from btx_core.cli.app import app, load, report
from btx_core.errors import BTXError
from btx_core.logs import quiet_model_loads

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
    "base": "The seed the experts were branched from: the merge-cost report gives each expert's "
            "distance from it, per kind of tensor",
    "merge_tokens": "Held-out tokens per expert's --data for the merge-cost losses (0: none)",
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

    from btx_core.config.schema import parse_bytes
    from btx_core.moe.mix import MixOptions

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
        dtype: str = _option(None, "dtype", "--dtype"),
        base: Path = _option(None, "base", "--base"),
        merge_tokens: int = _option(512, "merge_tokens", "--merge-cost-tokens")) -> None:
    """Mix dense experts into one Mixtral MoE: a run's experts (CONFIG), or any directories."""
    if (config is None) == (not expert):
        raise BTXError("give either CONFIG (mix a run's experts) or --expert DIR ... --out DIR")
    if config is not None:
        from btx_core.stages.mix import mix_stage

        report("mix", mix_stage(load(config)))
        return
    if not out:
        raise BTXError("--expert needs --out DIR (where the MoE is written)")
    _existing_dirs("--expert", expert)
    _existing_dirs("--base", [base] if base else [])
    quiet_model_loads()
    from btx_core.stages.mix_dirs import experts_from_dirs, mix_dirs, samples_from_paths

    experts = experts_from_dirs(expert, name)
    names = [e.name for e in experts]
    if copy_from and copy_from.isdigit() and copy_from not in names and int(copy_from) < len(names):
        copy_from = names[int(copy_from)]  # an index, as mergekit users write it
    options = _mix_options(top_k, shared, weight, copy_from, exclude, router_init, shard_size, dtype)
    samples = samples_from_paths(experts, data, seq_len=seq_len, count=32) if data else None
    report("mix", mix_dirs(experts, out, options, samples=samples,
                           base=base.expanduser().resolve() if base else None, merge_cost_tokens=merge_tokens))


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
        from btx_core.stages.mix import mix_stage

        report("upcycle", mix_stage(load(config), upcycle=True))
        return
    if not out:
        raise BTXError("--model needs --out DIR (where the MoE is written)")
    _existing_dirs("--model", [model])
    quiet_model_loads()
    from btx_core.stages.mix_dirs import experts_from_dirs, mix_dirs

    sources = experts_from_dirs([model] * experts, [f"copy{i}" for i in range(experts)])
    options = _mix_options(top_k, "mean", [], None, [], router_init, shard_size, None)
    report("upcycle", mix_dirs(sources, out, options, stage="upcycle"))


moe_app = typer.Typer(no_args_is_help=True, help="Edit a mixed MoE.")
app.add_typer(moe_app, name="moe")


@moe_app.command("drop-expert")
def drop_expert(moe: str = typer.Argument(..., help="The MoE directory"),
                expert: str = typer.Option(..., "--expert", "-e", help="Expert to drop (name or index)"),
                out: str = typer.Option(..., "--out", "-o", help="Output directory")) -> None:
    """Write the MoE without one expert (its FFNs and router rows removed), as an opt-out."""
    from btx_core.stages.mix_dirs import drop_expert_dir

    quiet_model_loads()
    report("drop-expert", drop_expert_dir(moe, expert, out))
