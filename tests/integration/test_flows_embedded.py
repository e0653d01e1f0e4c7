"""The whole DAG as a Prefect flow in embedded mode, on configs/ci.yaml against a test API:
a branch that fails after its first checkpoint is retried and resumes from it; every artifact
exists; a rerun trains nothing; retrying a failed parent run reruns only the failed branch."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from btx_core.store.manifest import Manifest
from tests.support import faults

ROOT = Path(__file__).parents[2]
DOMAINS = ("math", "code", "knowledge")


def config(tmp: Path, store: Path, **orchestration):
    from btx_core.config.load import parse_config

    raw = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    raw.update(store=str(store), cache_dir=str(tmp / "cache"),
               orchestration={"retry_delay_s": 0.0, **orchestration})
    return parse_config(raw)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A Prefect test API, with task results in a temporary directory."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("results")
    with prefect_test_harness(server_startup_timeout=60), \
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        from prefect.settings import PREFECT_API_URL

        yield {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOCAL_STORAGE_PATH": str(results)}


@pytest.fixture(scope="module")
def first_run(api, tmp_path_factory):
    from flows.pipeline import btx_pipeline

    tmp = tmp_path_factory.mktemp("embedded")
    cfg = config(tmp, tmp / "store", retries=1)
    fault = tmp / "fault"
    with faults.armed(fault):
        started = time.perf_counter()
        state = btx_pipeline(cfg, return_state=True)
        took = time.perf_counter() - started
    assert state.is_completed(), state.message
    return cfg, state, fault, took


def manifest(location: str) -> dict:
    return json.loads((Path(location) / "_manifest.json").read_text())


def latest_artifacts(keys: list[str]) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
            key=ArtifactCollectionFilterKey(any_=keys)))
    return {a.key: a for a in found}


def test_pipeline_completes_and_the_failed_branch_resumed_from_its_checkpoint(first_run):
    cfg, state, fault, took = first_run
    locations = state.result()
    assert set(locations) == {"seed", *(f"expert[{d}]" for d in DOMAINS), "mix", "finetune", "evaluate"}
    for name, location in locations.items():
        weights = "results.json" if name == "evaluate" else "model.safetensors"
        assert (Path(location) / "_manifest.json").is_file() and (Path(location) / weights).is_file()
    finetuned = manifest(locations["finetune"])
    mix_hash = Manifest.from_json((Path(locations["mix"]) / "_manifest.json").read_bytes()).hash
    assert finetuned["stage"] == "finetune" and finetuned["inputs"]["model"] == mix_hash
    mixed = manifest(locations["mix"])
    assert mixed["stage"] == "mix" and mixed["metrics"]["experts"] == [*DOMAINS, "seed"]
    for d in DOMAINS:  # the mix records the very experts this run trained
        expert = Manifest.from_json((Path(locations[f"expert[{d}]"]) / "_manifest.json").read_bytes())
        assert mixed["inputs"][f"expert:{d}"] == expert.hash
    failed = fault.read_text().split("]")[0].removeprefix("expert[")
    assert failed in DOMAINS, fault.read_text()
    for domain in DOMAINS:
        m = manifest(locations[f"expert[{domain}]"])["metrics"]
        # The fault hits at the first report past checkpoint_every (step 10 of 12, checkpoints
        # every 4): the retry resumes from step 8, the others never stopped.
        assert m["resumed_from_step"] == (8 if domain == failed else 0), domain
        assert m["steps"] == 12 and m["heldout_loss"] < m["seed_heldout_loss"]
    print(f"first run: {took:.1f} s")


def test_every_artifact_is_published_under_stable_keys(first_run):
    cfg, state, _, _ = first_run
    locations = state.result()
    keys = ["ci-seed-progress", *(f"ci-expert-{d}-progress" for d in DOMAINS), "ci-mix-progress",
            "ci-finetune-progress", "ci-evaluate-progress", "ci-evaluation", "ci-compute", "ci-checkpoints", "ci-loss-curves", "ci-routing"]
    found = latest_artifacts(keys)
    assert sorted(found) == sorted(keys)
    heatmap = found["ci-routing"].data
    assert base64.b64decode(heatmap.split("data:image/png;base64,")[1].split(")")[0]).startswith(b"\x89PNG")
    # Where each domain's tokens go (BTX, evaluated), not only each expert's load.
    assert "routing per domain (BTX after finetuning)" in heatmap and "| Domain |" in heatmap
    assert all(f"{d} tokens -> expert {d}" in heatmap for d in DOMAINS)
    for key in keys[:4]:
        assert found[key].type == "progress" and float(found[key].data) == 100.0, key

    evaluation = json.loads(found["ci-evaluation"].data)
    assert [row["set"] for row in evaluation] == [*DOMAINS, "average", "mixed"]
    losses = manifest(locations["evaluate"])["metrics"]["losses"]
    for row in evaluation[:len(DOMAINS)]:
        assert row["expert"] == pytest.approx(losses[f"expert:{row['set']}"]["single"][row["set"]], abs=1e-4)
        assert row["expert"] < row["seed"]  # each expert beats the seed on its own domain
    for row in evaluation:
        assert {"seed", "btx-mix", "btx", "btm-top1", "btm-top2"} <= set(row) and row["btx"] > 0

    compute = {row["stage"]: row for row in json.loads(found["ci-compute"].data)}
    assert set(compute) == set(locations) - {"evaluate"}
    assert compute["seed"]["steps"] == 20 and compute["seed"]["tokens"] == 20 * 4 * 64
    assert all(compute[f"expert[{d}]"]["steps"] == 12 and compute[f"expert[{d}]"]["wall_s"] > 0 for d in DOMAINS)

    checkpoints = found["ci-checkpoints"].data
    for name, location in locations.items():
        assert name == "evaluate" or f"(file://{location})" in checkpoints
    assert "step 12: " in checkpoints and "step 20: " in checkpoints

    curves = found["ci-loss-curves"].data
    png = base64.b64decode(curves.split("data:image/png;base64,")[1].split(")")[0])
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_a_rerun_of_the_finished_pipeline_trains_nothing(first_run):
    from flows.pipeline import btx_pipeline

    cfg, state, _, _ = first_run
    before = {name: manifest(loc) for name, loc in state.result().items()}
    again = btx_pipeline(cfg, return_state=True)
    assert again.is_completed() and again.result() == state.result()
    assert {name: manifest(loc) for name, loc in state.result().items()} == before


def test_retrying_a_failed_parent_run_reruns_only_the_failed_branch(api, first_run, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import btx_pipeline

    first_cfg, first_state, _, _ = first_run
    store = tmp_path / "store"
    shutil.copytree(Path(first_state.result()["seed"]).parent, store / "ci" / "seed")
    cfg = config(tmp_path, store, retries=0)
    fault = tmp_path / "fault"
    with faults.armed(fault):
        failed_state = btx_pipeline(cfg, return_state=True)
    assert failed_state.is_failed()
    failed = fault.read_text().split("]")[0].removeprefix("expert[")
    done = {d: manifest(store / "ci" / "experts" / d / "model") for d in DOMAINS if d != failed}
    assert len(done) == 2 and not (store / "ci" / "experts" / failed / "model").exists()

    run_id = str(failed_state.state_details.flow_run_id)
    env = dict(os.environ, **api, **faults.process_env(fault))
    retry = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", run_id,
                            "--entrypoint", "flows/pipeline.py:btx_pipeline"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]

    resumed = manifest(store / "ci" / "experts" / failed / "model")["metrics"]
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == 12
    assert {d: manifest(store / "ci" / "experts" / d / "model") for d in done} == done
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        assert client.read_flow_run(run_id).state.is_completed()
    cached = {r.name.split("-")[0] if r.name.startswith("seed") else r.name
              for r in runs if r.state.name == "Cached"}
    # The seed and the finished branches are the cached results of the first attempt.
    assert cached == {"seed", *(f"expert[{d}]" for d in done)}, [(r.name, r.state.name) for r in runs]


def test_compare_flow_runs_a_task_per_seed_and_publishes_the_table(first_run):
    """`btx-compare` on the finished pipeline's store: the shared seed and seed 0's BTX are
    reused, the baselines train, each seed is a task, the table and claims are an artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from btx_core.stages.common import open_store
    from btx_core.store import layout
    from flows.compare import compare_flow

    cfg = first_run[0]
    cfg = cfg.model_copy(update={"compare": cfg.compare.model_copy(update={"seeds": [0, 1]})})
    state = compare_flow(cfg, return_state=True)
    assert state.is_completed(), state.message
    location = state.result()
    assert location == layout.compare_results(cfg.run_root) and open_store(cfg).is_complete(location)
    report = json.loads((Path(location) / "results.json").read_text())
    assert report["seeds"] == [0, 1] and {"btx", "upcycle-flops", "dense-tokens", "btm-top1"} <= set(report["summary"])
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    # Named tasks keep their names; the others are "<task>-<n>".
    names = {r.name if r.name.startswith("compare[") else r.name.rsplit("-", 1)[0]: r.state.name for r in runs}
    assert names == {"seed": "Completed", "compare[seed 0]": "Completed", "compare[seed 1]": "Completed",
                     "compare-report": "Completed"}, names
    artifact = latest_artifacts(["ci-compare"])["ci-compare"]
    assert "| Model | math | code | knowledge | Average | Mixed-domain |" in artifact.data
    assert "expert math beats the seed on math" in artifact.data and location in artifact.data


def test_btx_run_command_runs_the_whole_pipeline(tmp_path):
    """The README's main job, as a user types it: no server, embedded Prefect."""
    raw = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    raw.update(store=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "ci.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.run([sys.executable, "-m", "btx_core.cli", "run", "ci.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pipeline 'ci' complete" in proc.stdout
    # A quiet console: no library request line (an embedded API's `HTTP Request: ... 422` reads as
    # an error), from this process or a branch's (issue 26).
    chatter = [line for line in (proc.stdout + proc.stderr).splitlines() if "HTTP Request:" in line]
    assert not chatter, chatter[:5]
    for stage in ("seed", "expert[math]", "expert[code]", "expert[knowledge]", "mix"):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(stage + " "))
        assert "complete" in line, line
    # It ends with the answer, not with stage locations (issue 14, failure 11): held-out loss of
    # the seed, each expert, BTM, MiX and BTX per domain, the routing, and a report that stays.
    tail = proc.stdout[proc.stdout.index("Held-out loss, nats/token"):]
    header = tail.splitlines()[1].split()
    assert header[:5] == ["held-out", "loss", "seed", "expert:math", "expert:code"] and "btx" in header, tail
    for row in ("math", "code", "knowledge", "average", "mixed"):
        assert any(line.split()[:1] == [row] for line in tail.splitlines()), (row, tail)
    assert "go first to expert" in tail, tail
    report = tmp_path / "store" / "ci" / "report"
    assert "Report (kept in the store): " in tail and f"{report}/report.md" in tail, tail
    from btx_core.store.core import Store

    kept = Store(str(tmp_path / "store")).verify(str(report))
    assert {"report.md", "loss-curves.png", "routing.png"} <= set(kept.files), kept.files
    text = (report / "report.md").read_text()
    assert "expert:knowledge" in text and "![Training loss](loss-curves.png)" in text, text
    assert "![routing per domain](routing.png)" in text and "knowledge tokens -> expert knowledge" in text, text

