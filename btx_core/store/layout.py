"""Where each stage's output lives in the store. One place, so flows, CLI and tests agree.

    <store>/<run_name>/seed/tokenizer             tokenizer of a created seed
    <store>/<run_name>/seed/model                 the seed, HF layout
    <store>/<run_name>/seed/checkpoints/step-N    resumable pretraining checkpoints
    <store>/<run_name>/experts/<domain>/model     a trained expert, HF layout
    <store>/<run_name>/experts/<domain>/checkpoints/step-N
    <store>/<run_name>/mix/model                  the mixed MoE (BTX), HF layout
    <store>/<run_name>/upcycle/model              sparse upcycling: the MoE of seed copies
    <store>/<run_name>/trained/<name>/model       finetuned: btx, upcycle-tokens, dense-flops, ...
    <store>/<run_name>/trained/<name>/checkpoints/step-N
    <store>/<run_name>/compare/results            `btx compare`: tables, JSON, heatmaps
    <store>/<run_name>/compare/scores             `btx compare`: one random seed's rows and routing
    <store>/<run_name>/ablations/<name>/mix       `btx ablate`: a MiX ablation's mixed MoE
    <store>/<run_name>/ablations/results          `btx ablate`: its table (JSON, markdown)
    <store>/<run_name>/eval/results               the pipeline's evaluation (JSON)
    <store>/_data/<key>                           tokenized, packed and split corpora (shared by runs)

Beside them: `<stage prefix>/_writer.json` (the parent of a stage's output: `<run>/seed`,
`<run>/experts/<domain>`, `<run>/mix`, ...), the writer lease a stage holds while it writes
there (lease.py; `_writer.json.lock` on local stores), and `<store>/_btx/conditional-writes-probe`,
the object that S3 stores are asked to refuse a conditional write on (lease_slot.py).
"""

from __future__ import annotations

from collections.abc import Callable

# Locations are made from values, not from the pipeline's config: a stage hands over its run's
# folder, `config.run_root` (`<store>/<run_name>`), or for the shared data cache `config.store`.


def _join(*parts: str) -> str:
    if not isinstance(parts[0], str):
        raise TypeError(f"a location is made from the run's folder (config.run_root) or the store's root "
                        f"(config.store), not from a {type(parts[0]).__name__}")
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def data_cache(store: str, key: str) -> str:
    """`<store>/_data/<key>`; `store`: the store's root as the config names it."""
    return _join(store, "_data", key)


def _in_run(*parts: str) -> Callable[[str], str]:
    """run -> `<run>/<parts>`, where `run` is `<store>/<run_name>`."""
    return lambda run: _join(run, *parts)


def _per_name(folder: str, leaf: str) -> Callable[[str, str], str]:
    """(run, name) -> `<run>/<folder>/<name>/<leaf>`; name: a domain or a trained model."""
    return lambda run, name: _join(run, folder, name, leaf)


# The table in the docstring, a row each: `seed_model(run)`, `expert_model(run, domain)`, ...
seed_tokenizer = _in_run("seed", "tokenizer")
seed_model = _in_run("seed", "model")
seed_checkpoints = _in_run("seed", "checkpoints")
expert_model = _per_name("experts", "model")
expert_checkpoints = _per_name("experts", "checkpoints")
mix_model = _in_run("mix", "model")
upcycle_model = _in_run("upcycle", "model")
trained_model = _per_name("trained", "model")
trained_checkpoints = _per_name("trained", "checkpoints")
compare_results = _in_run("compare", "results")
compare_scores = _in_run("compare", "scores")
ablation_mix = _per_name("ablations", "mix")
ablation_results = _in_run("ablations", "results")
eval_results = _in_run("eval", "results")
