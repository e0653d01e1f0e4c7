"""Credentials never leave the environment they are given in.

The distributed cluster of tests/prefect_harness.py runs every process (Prefect server, workers,
flow runs, CLI) with unique, recognisable fake credentials: an S3 key pair, a Prefect API key,
and the PostgreSQL password in the server's database URL. After the shared pipeline run, and after
flow runs that fail on S3 errors, these tests search every log line (the processes' log files and
the flow-run logs on the server), every artifact, event, flow-run parameter and state message
(read through the Prefect API), and every object in the store's bucket: none holds a credential.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
import traceback
from collections.abc import Callable, Iterable, Iterator

import pytest

from tests.prefect_harness import EXPERT_POOLS, S3_BUCKET, S3_KEY_ID, S3_SECRET, Cluster, PipelineRun


def _leaks(cluster: Cluster, data: str | bytes) -> list[str]:
    """The names of the credentials that occur in `data`."""
    blob = data.encode() if isinstance(data, str) else data
    return [name for name, value in cluster.credentials.items() if value.encode() in blob]


def _exception_text(exc: BaseException) -> str:
    """Everything an exception can show: its traceback, and every exception chained to it, even
    those a traceback hides (`raise ... from None` keeps them in `__context__`)."""
    parts, seen = ["".join(traceback.format_exception(exc))], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts += [str(exc), repr(exc), repr(exc.args)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _paged(read: Callable[[int, int], list], page: int = 200) -> Iterator:
    offset = 0
    while batch := read(page, offset):
        yield from batch
        offset += len(batch)


def _events(cluster: Cluster) -> Iterator[dict]:
    """Every event the server holds (the REST API; the client has no reader for them)."""
    import httpx

    response = httpx.post(f"{cluster.api_url}/events/filter", json={"limit": 50}, timeout=30)
    while True:
        response.raise_for_status()
        page = response.json()
        yield from page["events"]
        if not page.get("next_page"):
            return
        response = httpx.get(page["next_page"], timeout=30)


def _dump(objects: Iterable) -> Iterator[str]:
    for obj in objects:
        yield obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj, default=str)


def _failing_branch_config(run: PipelineRun, store: str) -> dict:
    config = copy.deepcopy(run.config)
    config["store"] = store
    config["orchestration"]["retries"] = 0  # fail at once: the error, not the backoff, is tested
    return config


def test_s3_errors_never_echo_a_secret(btx_pipeline_run: PipelineRun, s3_endpoint: str,
                                       s3_auth_enforced: None) -> None:
    """A missing bucket and refused credentials, raised by btx_core.store.core.Store in this process
    and inside branches run by the workers: each error names the fix, and neither the exception
    (its whole chain), nor the flow run's state, logs or worker log holds a credential."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from btx_core.errors import StoreError
    from btx_core.store.core import Store

    cluster = btx_pipeline_run.deployed.cluster
    missing = f"s3://btx-missing-{secrets.token_hex(4)}/pipelines"
    refusing = f"s3://btx-test-store/creds-{secrets.token_hex(4)}"  # a server that checks keys
    expected = {"missing bucket": "does not exist", "refused credentials": "access denied"}

    # In this process, through the Store itself.
    for case, uri, endpoint in (("missing bucket", missing, cluster.s3_endpoint),
                                ("refused credentials", refusing, s3_endpoint)):
        store = Store(uri, {"key": S3_KEY_ID, "secret": S3_SECRET, "skip_instance_cache": True,
                            "client_kwargs": {"endpoint_url": endpoint}})
        with pytest.raises(StoreError, match=expected[case]) as err:
            store.read_manifest(store.child("seed", "model"))
        text = _exception_text(err.value)
        assert not _leaks(cluster, text), (case, _leaks(cluster, text), text)

    # In branches on the workers: one per expert pool, at once. The refused one reaches the
    # checking server through the run's job variables (the workers' own endpoint accepts any key).
    branches = {"missing bucket": (missing, EXPERT_POOLS[0], {}),
                "refused credentials": (refusing, EXPERT_POOLS[1], {"AWS_ENDPOINT_URL_S3": s3_endpoint})}
    runs = {}
    with cluster.client() as client:
        for case, (store, pool, env) in branches.items():
            deployment = btx_pipeline_run.deployed.deployments[f"train-expert/{pool}"]
            runs[case] = client.create_flow_run_from_deployment(
                deployment.id, parameters={"config": _failing_branch_config(btx_pipeline_run, store),
                                           "domain": "math"},
                job_variables={"env": env})
    for case, run in runs.items():
        state = cluster.wait_flow_run(run.id, 180).state
        assert state.is_failed(), (case, state, cluster.diagnostics())
        assert expected[case] in (state.message or ""), (case, state.message)
        # The run's last log lines reach the API after its final state (they are shipped in
        # batches): wait for them.
        deadline, text = time.monotonic() + 60, ""
        while not (expected[case] in text and "Traceback" in text) and time.monotonic() < deadline:
            time.sleep(1)
            with cluster.client() as client:
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            text = "\n".join(log.message for log in logs)
        assert expected[case] in text and "Traceback" in text, (case, text[-3000:])
        assert not _leaks(cluster, text + str(state.message)), (case, _leaks(cluster, text), text)
    for pool in EXPERT_POOLS:
        text = (cluster.logs / f"worker-{pool}.log").read_bytes()
        assert not _leaks(cluster, text), (pool, _leaks(cluster, text))


def test_no_credential_in_any_log_artifact_event_or_stored_file(btx_pipeline_run: PipelineRun) -> None:
    """After the pipeline run (and whatever else this session ran on the cluster): every log file,
    log line, artifact, event, flow run, deployment and work pool on the server, and every object
    in the bucket, searched for the credentials the processes held."""
    import boto3

    cluster = btx_pipeline_run.deployed.cluster
    # The search finds what it looks for: the workers really hold the credentials.
    for pool in EXPERT_POOLS:
        environ = open(f"/proc/{cluster.services[f'worker-{pool}'].proc.pid}/environ", "rb").read()
        assert {"AWS_SECRET_ACCESS_KEY", "PREFECT_API_KEY"} <= set(_leaks(cluster, environ))

    found: list[tuple[str, list[str]]] = []
    searched: dict[str, int] = {}

    def search(where: str, items: Iterable[str | bytes]) -> None:
        searched[where] = 0
        for item in items:
            searched[where] += 1
            if leaked := _leaks(cluster, item):
                found.append((f"{where}: {item[:300]!r}", leaked))

    search("log files", (p.read_bytes() for p in sorted(cluster.logs.rglob("*")) if p.is_file()))
    with cluster.client() as client:
        search("flow-run logs", (log.message for log in _paged(
            lambda limit, offset: client.read_logs(limit=limit, offset=offset))))
        search("artifacts", _dump(_paged(lambda limit, offset: client.read_artifacts(limit=limit, offset=offset))))
        search("flow runs", _dump(_paged(lambda limit, offset: client.read_flow_runs(limit=limit, offset=offset))))
        search("task runs", _dump(_paged(lambda limit, offset: client.read_task_runs(limit=limit, offset=offset))))
        search("deployments", _dump(client.read_deployments()))
        search("work pools", _dump(client.read_work_pools()))
    search("events", _dump(_events(cluster)))

    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, aws_access_key_id=S3_KEY_ID,
                      aws_secret_access_key=S3_SECRET)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET)
            for o in page.get("Contents", [])]
    search("stored objects", (key.encode() + b"\n" + s3.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
                              for key in keys))
    print("searched:", searched)
    assert not found, found
    # Each source was really read: the pipeline logs, publishes artifacts and writes manifests.
    assert searched["flow-run logs"] > 50 and searched["artifacts"] > 5 and searched["events"] > 50, searched
    assert sum(key.endswith("/_manifest.json") for key in keys) >= 4, keys

