"""Shared by bench/pipeline_*.py: configs in a scratch directory, fresh stores that keep the
tokenized data (so rounds time training and orchestration, not tokenizing), medians."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet() -> None:
    """No per-load progress bars from transformers between the tables."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load(raw: dict, work: Path, store: str):
    from btx_core.config.load import parse_config

    raw = {**raw, "store": str(work / store), "cache_dir": str(work / "cache")}
    return parse_config(raw)


def ci_raw() -> dict:
    return yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())


def fresh_store(warm: Path, target: Path, keep: tuple[str, ...]) -> None:
    """`target` := the data cache of `warm` plus the run's outputs named in `keep` (e.g. the seed)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(warm / "_data", target / "_data")
    for run_dir in (p for p in warm.iterdir() if p.name != "_data"):
        for part in keep:
            if (run_dir / part).exists():
                shutil.copytree(run_dir / part, target / run_dir.name / part)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, " \
           f"load {os.getloadavg()[0]:.1f} at start"


def median(xs: list[float]) -> float:
    return statistics.median(xs)
