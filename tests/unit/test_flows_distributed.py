"""The unit tests of tests/integration/test_flows_distributed.py, which holds their helpers and
fixtures."""

from __future__ import annotations

import re


def test_worker_image_installs_the_tested_torch_first() -> None:
    """infra/Dockerfile pins the torch that `make setup` tests with, and installs it before the
    project (else pip resolves `torch>=2.4,<3` itself and may pull another build)."""
    from tests.prefect_harness import REPO

    makefile = (REPO / "Makefile").read_text()
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    (tested,) = re.findall(r"pip install -q torch==([\w.]+)", makefile)
    (pinned,) = re.findall(r"^ARG TORCH_VERSION=([\w.]+)$", dockerfile, re.M)
    assert pinned == tested
    lines = dockerfile.splitlines()
    torch_at = next(i for i, l in enumerate(lines) if 'pip install "torch==${TORCH_VERSION}"' in l)
    project_at = [i for i, l in enumerate(lines) if re.search(r"pip install .*(requirements|\s\.$)", l)]
    assert project_at and all(torch_at < i for i in project_at), (torch_at, project_at)

