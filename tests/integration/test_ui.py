"""The Prefect UI, rendered: headless Chromium opens the finished pipeline run's page on the test
server (tests/prefect_harness.py) and must show its tasks and its artifacts, as a user sees them,
and the routing artifact's page must draw where each domain's tokens go, per layer group.

The screenshot goes to pytest's temporary directory; to refresh the one in the docs, run
`BTX_UI_SCREENSHOT=docs/prefect-ui-run.png .venv/bin/pytest tests/integration/test_ui.py`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from flows.progress import artifact_key
from tests.chromium import Browser
from tests.prefect_harness import REPO, PipelineRun


def _artifacts(run: PipelineRun) -> list:
    """The artifacts the pipeline run (its tasks) created, from the API."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with run.deployed.cluster.client() as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.flow_run.id])))


def check_routing_page(browser: Browser, ui_url: str, artifact_id: str, domains: list[str]) -> str:
    """Open the routing artifact's page: the per-domain heatmap must be drawn (a decoded PNG, not a
    broken image) and the tables per layer group and per layer rendered. Returns the page's text."""
    browser.open(f"{ui_url}/artifacts/artifact/{artifact_id}")
    text = browser.wait_for_text(["routing per domain", "Per layer group", "Least-used expert",
                                  *(f"{d} tokens -> expert {d}" for d in domains)], timeout=60)
    drawn = "[...document.images].filter(i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 300)"
    deadline = time.monotonic() + 30
    while not browser.evaluate(f"{drawn}.length") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert browser.evaluate(f"{drawn}.length") == 1, "the routing heatmap is not drawn on the artifact page"
    # The image is laid out where a user sees it, not collapsed to nothing.
    assert browser.evaluate(f"{drawn}[0].getBoundingClientRect().width") > 300
    return text


def check_run_page(browser: Browser, ui_url: str, flow_run_id: str, task_names: list[str],
                   artifact_keys: list[str], screenshot: Path | None = None) -> dict[str, str]:
    """Open a flow run's page; wait until its Task Runs and Artifacts tabs show every name
    given; optionally save a screenshot (the run graph above, the artifacts below).
    Returns each tab's rendered text."""
    browser.open(f"{ui_url}/runs/flow-run/{flow_run_id}")
    browser.wait_for_text(["Task Runs", "Artifacts", "Completed"], timeout=90)
    shown = {}
    for tab, needles in (("Task Runs", task_names), ("Artifacts", artifact_keys)):
        assert browser.click_text(tab), f"no {tab!r} tab on the run page"
        shown[tab] = browser.wait_for_text(needles, timeout=60)
    if screenshot is not None:
        # The run graph is drawn on a WebGL canvas (no DOM text); give it time to lay out.
        assert browser.evaluate("document.querySelectorAll('canvas').length") >= 1
        time.sleep(3)
        browser.screenshot(screenshot)
    return shown


def test_run_page_shows_tasks_and_artifacts(btx_pipeline_run: PipelineRun, tmp_path: Path) -> None:
    run = btx_pipeline_run
    assert run.flow_run.state.is_completed(), run.flow_run.state
    domains = [d["name"] for d in run.config["domains"]]
    artifacts = _artifacts(run)
    keys = sorted({a.key for a in artifacts if a.key})
    assert keys, "the pipeline run created no keyed artifact"
    target = Path(os.environ.get("BTX_UI_SCREENSHOT") or tmp_path / "prefect-ui-run.png")
    if not target.is_absolute():
        target = REPO / target
    with Browser(height=1200) as browser:
        shown = check_run_page(browser, run.deployed.cluster.ui_url, str(run.flow_run.id),
                               [f"expert[{d}]" for d in domains], keys, screenshot=target)
        # Where each domain's tokens go, per layer group, as the pipeline's last report drew it.
        routing = max((a for a in artifacts if a.key == artifact_key(run.config["run_name"], "routing")),
                      key=lambda a: a.created)
        page = check_routing_page(browser, run.deployed.cluster.ui_url, str(routing.id), domains)
    assert re.search(r"^layers? \d+(-\d+)?$", page, re.M | re.I), page[:3000]  # a table per layer group
    # Every stage's task is listed: the branches and the stages on a pool by name, the report by run name.
    tasks = shown["Task Runs"]
    assert re.search(r"^seed(-\w+)?$", tasks, re.M) and re.search(r"^report-\w+$", tasks, re.M), tasks
    assert target.stat().st_size > 20_000  # a rendered page, not a blank one

