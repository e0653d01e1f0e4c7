"""Shared fixtures. Telemetry off everywhere: no outbound calls from tests."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.conftest_s3", "tests.prefect_harness"]


# Markers come from the directory a test lies in, not from the test: tests/unit -> unit,
# tests/integration -> integration, tests/faults -> integration and faults, tests/gpu -> gpu.
# `slow` (and skipif) stay on the tests they describe.
TESTS = Path(__file__).resolve().parent
MARKS_OF_DIR = {"unit": ("unit",), "integration": ("integration",), "faults": ("integration", "faults"),
                "gpu": ("gpu",)}


def pytest_collect_file(file_path: Path, parent):
    """A test file outside the kind directories would carry no marker, and `make test` would skip it."""
    if file_path.name.startswith("test_") and file_path.suffix == ".py" and TESTS in file_path.parents:
        if file_path.relative_to(TESTS).parts[0] not in MARKS_OF_DIR:
            raise pytest.UsageError(
                f"{file_path}: a test file must lie in one of tests/{{{','.join(MARKS_OF_DIR)}}}/, "
                f"whose directory gives its markers (docs/testing.md)")


def pytest_itemcollected(item: pytest.Item) -> None:
    for mark in MARKS_OF_DIR[Path(item.path).relative_to(TESTS).parts[0]]:
        item.add_marker(mark)
