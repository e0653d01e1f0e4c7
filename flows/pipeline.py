"""The BTX pipeline as one Prefect flow, `btx-pipeline`: seed -> one expert branch per domain,
in parallel -> (MiX -> MoE-finetune -> evaluate) -> report. Its one parameter is the typed
config, so the Prefect UI renders it as a form.

Expert branches run one of two ways (`orchestration.expert_runner`), from the same flow code:
- `local` (default; `btx run`, embedded mode): tasks of this flow run, at most
  `max_parallel_branches` at once, each on its share of the cores, in a process of its own
  when several run together (flows/local.py);
- `deployments`: each branch is a run of `train-expert/<pool>` on the branch's work pool.
Stages hand each other store locations; every stage finds its own finished output by manifest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prefect import flow, get_run_logger, runtime, task
from prefect.client.orchestration import get_client
from prefect.exceptions import TerminationSignal
from prefect.futures import wait
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner

from btx_core.config.schema import BTXConfig
from btx_core.errors import BTXError, IncompleteOutputError
from btx_core.store import layout
from btx_core.training.stop import request_stop
from flows.local import branch_processes
from flows.options import cores, waiting_retry_policy
from flows.progress import artifact_key, forward_library_logs, run_name
from flows.remote import run_child
from flows.run_slot import RunSlot
from flows.tasks import STAGE_TASKS, expert_task_for, report_task

OVERLAP_POLL_S = 5.0  # how often a run waiting for its run name's slot tries again


class BranchesFailed(BTXError):
    """One or more expert branches failed (the others finished and are kept)."""


@flow(name="btx-pipeline", flow_run_name=run_name(), task_runner=ThreadPoolTaskRunner())
def btx_pipeline(config: BTXConfig) -> dict[str, str]:
    """Branch-Train-MiX: seed -> experts (in parallel) -> mix -> (finetune -> evaluate, with a
    `finetune` section) -> report. Returns stage -> store location."""
    forward_library_logs()
    give_up_after_crashes(config)
    try:
        with one_run_per_name(config) as admitted:
            if not admitted:
                return Cancelled(message=f"another run of {config.run_name!r} is running "
                                         "(orchestration.on_overlap: cancel)")
            return _pipeline(config)
    except (TerminationSignal, KeyboardInterrupt) as stop:  # SIGTERM, a cancel, Ctrl-C: training
        request_stop(f"the pipeline flow run is stopping ({type(stop).__name__})")  # in threads stops too
        raise


def give_up_after_crashes(config: BTXConfig) -> None:
    """A pipeline run rescheduled after crashing (flows/automations.py) runs again at most
    `orchestration.retries` times: one that always crashes (a bad node image, an OOM of the
    parent itself) then fails, which nothing reschedules."""
    if runtime.flow_run.run_count <= 1 or runtime.flow_run.id is None:
        return
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        history = sorted(client.read_flow_run_states(runtime.flow_run.id), key=lambda s: s.timestamp)
    since = max((i for i, s in enumerate(history) if s.type == StateType.FAILED), default=-1)  # a retry by hand
    # Attempts that ended Crashed (one crash may be reported twice, so Crashed states are not counted).
    attempts = [s.type for s in history[since + 1:] if s.type in (StateType.RUNNING, StateType.CRASHED)]
    crashes = sum(1 for a, b in zip(attempts, attempts[1:]) if a == StateType.RUNNING and b == StateType.CRASHED)
    if crashes > config.orchestration.retries:
        raise BTXError(f"this pipeline run crashed {crashes} times (orchestration.retries = "
                       f"{config.orchestration.retries}): not running it again. See the logs of its attempts; "
                       "retry it from the UI once the cause is fixed (that starts a new count)")
    if crashes:
        get_run_logger().warning("attempt %d of this pipeline run, after %d crash(es): re-attaching to the "
                                 "children of its earlier attempts", runtime.flow_run.run_count, crashes)


def run_limit_name(run: str) -> str:
    """The global concurrency limit of a run name (`prefect gcl inspect btx-run-<run>`)."""
    return "btx-run-" + artifact_key(run)


@contextlib.contextmanager
def one_run_per_name(config: BTXConfig) -> Iterator[bool]:
    """Hold the run name's slot (flows/run_slot.py) for the whole run: two runs of one name would
    train the same stages into the same prefixes. A second run waits for the first
    (`on_overlap: queue`), or yields False (`cancel`). A lost lease or an API outage never ends
    this run, and a slot left behind by a run that died never blocks the next. Only against a
    Prefect server."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # Embedded (`btx run` without a server): no other run can see this API, and its database
        # outlives it without the service that expires the slots of killed runs. The store's
        # writer leases keep two `btx run`s of one config apart.
        yield True
        return
    o, logger = config.orchestration, get_run_logger()
    name = run_limit_name(config.run_name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)  # as it is: an operator may change it
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # two runs starting at once both try
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    slot = RunSlot(name, artifact_key(config.run_name), runtime.flow_run.id, lease_s=o.run_slot_lease_s,
                   outage_s=o.api_outage_s, logger=logger)
    slot.mark_started()
    said = None
    while not slot.take():
        why = slot.wait_reason()
        if o.on_overlap == "cancel" and slot.orphan_since is None:
            logger.warning("%s is taken (%s): cancelling this run (orchestration.on_overlap: cancel)", name, why)
            yield False
            return
        if why != said:
            logger.warning("%s is taken (%s): waiting for it (orchestration.on_overlap: %s)", name, why, o.on_overlap)
            said = why
        time.sleep(OVERLAP_POLL_S)
    slot.keep()
    try:
        yield True
    finally:
        slot.release()


def _pipeline(config: BTXConfig) -> dict[str, str]:
    seed = run_stage(config, "seed")
    seed.result()  # a failed seed fails the run here, with its own error
    run_branches = local_branches if config.orchestration.expert_runner == "local" else remote_branches
    experts = run_branches(config, seed)
    mix = run_stage(config, "mix", wait_for=list(experts.values()))
    mix.result()  # a failed mix fails the run here, with its own error
    done = {"seed": seed.result(), **{f"expert[{d}]": f.result() for d, f in experts.items()},
            "mix": mix.result()}
    last = mix
    if config.finetune is not None:
        done["finetune"] = run_stage(config, "finetune", wait_for=[mix]).result()
        last = run_stage(config, "evaluate")
        done["evaluate"] = last.result()
    report_task.submit(config, wait_for=[last]).result()
    return done


def run_stage(config: BTXConfig, stage: str, wait_for=()):
    """Submit a heavy stage: in this flow run's process, or as a `btx-stage/<pool>` deployment
    run when `orchestration.<stage>_pool` names a pool. Returns the future of its location."""
    if config.orchestration.stage_pool(stage) is None:
        return STAGE_TASKS[stage].submit(config, wait_for=list(wait_for))
    waiting = stage_on_pool_task.with_options(**waiting_retry_policy(config.orchestration))
    return waiting.submit(config, stage, wait_for=list(wait_for))


def local_branches(config: BTXConfig, seed) -> dict:
    """Every domain's expert as a task of this flow run, at most `max_parallel_branches` at once,
    each in a process of its own (see flows.local). Branches alone in this process run in a
    thread instead, with no process to start: one at a time, or already complete (their
    manifest matches: the stage only confirms it)."""
    o = config.orchestration
    done = [d.name for d in config.domains if _looks_complete(config, d.name, seed.result())]
    todo = [d.name for d in config.domains if d.name not in done]
    parallel = max(1, min(o.max_parallel_branches or len(todo), len(todo)))
    train, futures = expert_task_for(config), {}
    for names, runner in ((done, ThreadPoolTaskRunner(max_workers=1)),
                          (todo, branch_processes(parallel) if parallel > 1 else ThreadPoolTaskRunner(max_workers=1))):
        if names:
            with runner as r:
                futures |= {d: r.submit(train, {"config": config, "domain": d, "seed_location": seed,
                                                "threads": max(1, cores() // parallel)}) for d in names}
                wait(list(futures.values()))
    return _all_or_raise(futures)


def _looks_complete(config: BTXConfig, domain: str, seed_location: str) -> bool:
    from btx_core.stages.common import open_store
    from btx_core.stages.expert import expert_config_hash

    store = open_store(config)
    try:
        made = store.read_manifest(layout.expert_model(config.run_root, domain))
        return (made.config_hash == expert_config_hash(config, domain)
                and made.inputs.get("seed") == store.read_manifest(seed_location).hash)
    except IncompleteOutputError:
        return False


@task(name="expert-branch", task_run_name="expert[{domain}]", persist_result=True, result_serializer="json")
def expert_branch_task(config: BTXConfig, domain: str, seed_location: str) -> str:
    """Run one expert branch as a `train-expert/<pool>` deployment run; return its location."""
    pool = config.orchestration.domain_pools.get(domain, config.orchestration.expert_pool)
    run_child(f"train-expert/{pool}", {"config": config.model_dump(mode="json"), "domain": domain}, domain,
              config.orchestration, progress_key=artifact_key(config.run_name, "expert", domain, "progress"))
    return _stored(config, layout.expert_model(config.run_root, domain), f"expert[{domain}]")


# Where each stage that can run on a pool leaves its output: the parent reads it from the store.
STAGE_OUTPUTS = {"seed": layout.seed_model, "mix": layout.mix_model, "evaluate": layout.eval_results,
                 "finetune": lambda run: layout.trained_model(run, "btx")}


@task(name="stage-on-pool", task_run_name="{stage}", persist_result=True, result_serializer="json")
def stage_on_pool_task(config: BTXConfig, stage: str) -> str:
    """Run a stage as a `btx-stage/<pool>` deployment run on `orchestration.<stage>_pool` and
    wait for it (with the start deadline and the in-place retry of a crashed run); return its location."""
    pool = config.orchestration.stage_pool(stage)
    # The idempotency key's name cannot be a domain's (a domain name has no ':').
    run_child(f"btx-stage/{pool}", {"config": config.model_dump(mode="json"), "stage": stage}, f"stage:{stage}",
              config.orchestration, progress_key=artifact_key(config.run_name, stage, "progress"))
    return _stored(config, STAGE_OUTPUTS[stage](config.run_root), stage)


def _stored(config: BTXConfig, location: str, stage: str) -> str:
    from btx_core.stages.common import open_store

    try:
        open_store(config).read_manifest(location)
    except IncompleteOutputError:
        raise BTXError(f"{stage}: its flow run completed but {location} has no manifest: "
                       "do the work pool's workers write to the same store?") from None
    return location


def remote_branches(config: BTXConfig, seed) -> dict:
    """Every domain's expert as a run of its work pool's deployment, all at once."""
    waiting = expert_branch_task.with_options(**waiting_retry_policy(config.orchestration))
    futures = {d.name: waiting.submit(config, d.name, seed) for d in config.domains}
    return _all_or_raise(futures)


def _all_or_raise(futures: dict) -> dict:
    """Wait for every branch (so the finished ones are kept), then fail if any failed."""
    wait(list(futures.values()))
    failed = {d: f.state for d, f in futures.items() if not f.state.is_completed()}
    if failed:
        why = "\n".join(f"- {d}: {state.message or state.type.value}" for d, state in failed.items())
        raise BranchesFailed(f"expert branch(es) {', '.join(failed)} failed; the others are complete. "
                             f"Retry this flow run, or run it again: finished stages are reused.\n{why}")
    return futures
