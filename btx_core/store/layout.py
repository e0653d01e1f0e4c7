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
    <store>/<run_name>/eval/results               the pipeline's evaluation (JSON)
    <store>/_data/<key>                           tokenized, packed and split corpora (shared by runs)
"""

from __future__ import annotations

from btx_core.config.schema import BTXConfig


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def run_root(config: BTXConfig) -> str:
    return _join(config.store, config.run_name)


def seed_tokenizer(config: BTXConfig) -> str:
    return _join(run_root(config), "seed", "tokenizer")


def seed_model(config: BTXConfig) -> str:
    return _join(run_root(config), "seed", "model")


def seed_checkpoints(config: BTXConfig) -> str:
    return _join(run_root(config), "seed", "checkpoints")


def expert_model(config: BTXConfig, domain: str) -> str:
    return _join(run_root(config), "experts", domain, "model")


def expert_checkpoints(config: BTXConfig, domain: str) -> str:
    return _join(run_root(config), "experts", domain, "checkpoints")


def mix_model(config: BTXConfig) -> str:
    return _join(run_root(config), "mix", "model")


def upcycle_model(config: BTXConfig) -> str:
    return _join(run_root(config), "upcycle", "model")


def trained_model(config: BTXConfig, name: str) -> str:
    return _join(run_root(config), "trained", name, "model")


def trained_checkpoints(config: BTXConfig, name: str) -> str:
    return _join(run_root(config), "trained", name, "checkpoints")


def compare_results(config: BTXConfig) -> str:
    return _join(run_root(config), "compare", "results")


def eval_results(config: BTXConfig) -> str:
    return _join(run_root(config), "eval", "results")


def data_cache(config: BTXConfig, key: str) -> str:
    return _join(config.store, "_data", key)
