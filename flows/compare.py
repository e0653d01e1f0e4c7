"""`btx compare` as a Prefect flow, `btx-compare`: the shared seed, then one task per random seed
(train what is missing, evaluate every model), then the report, whose tables and claims become
a markdown artifact. Schedule it, retry a failed seed alone (a retry resumes from the store's
checkpoints), and read the table in the UI; the heatmaps and CSVs are in `<run>/compare/results`."""

from __future__ import annotations

import json
import time

from prefect import flow, get_run_logger, task

from btx_core.config.schema import BTXConfig
from flows.options import STAGE_TASK, cores, torch_threads
from flows.progress import artifact_key, forward_library_logs, run_name
from flows.tasks import seed_task


@task(name="compare-seed", task_run_name="compare[seed {seed}]", **STAGE_TASK)
def compare_seed_task(config: BTXConfig, seed: int) -> dict:
    """One random seed: experts, MiX, upcycling, the BTX finetune, the four compute-matched
    baselines, and the evaluation of every model (btx_core compare_seed)."""
    from btx_core.stages.compare import compare_seed

    logger = get_run_logger()
    with torch_threads(cores()):
        result = compare_seed(config, seed, stage=lambda s: logger.info("seed %d: %s", seed, s))
    return json.loads(json.dumps(result, default=float))  # plain JSON: the task's persisted result


@task(name="compare-report", **STAGE_TASK)
def compare_report_task(config: BTXConfig, per_seed: dict[int, dict], wall_s: float) -> str:
    """Tables, claims and heatmaps into the store; the tables and claims as an artifact."""
    from prefect.artifacts import create_markdown_artifact

    from btx_core.stages.compare import finish_compare, tables_markdown

    report = finish_compare(config, per_seed, wall_s=wall_s)
    markdown = "\n".join([*tables_markdown(report), f"Heatmaps, CSVs and results.json: `{report['location']}`"])
    create_markdown_artifact(markdown, key=artifact_key(config.run_name, "compare"),
                             description="btx compare: held-out loss per domain, compute-matched baselines")
    return report["location"]


@flow(name="btx-compare", flow_run_name=run_name("compare"))
def compare_flow(config: BTXConfig) -> str:
    """BTX vs the seed, each expert, BTM, sparse upcycling and a dense baseline (compute-matched
    in tokens and in FLOPs) over `compare.seeds`; returns the results' store location."""
    from btx_core.stages.finetune import settings_of

    forward_library_logs()
    settings_of(config)  # no `finetune` section: fail before any work
    started = time.perf_counter()
    seed_task(config)
    per_seed = {r: compare_seed_task(config, r) for r in config.compare.seeds}  # one at a time: each uses every core
    return compare_report_task(config, per_seed, time.perf_counter() - started)
