"""A parameter whose values are split between tests/unit/ and tests/integration/.

Markers come from a test's directory, so a test that runs on a local store (unit) and on S3
(integration) is defined once, taking its parameter from a fixture that each directory's module
declares with its own values: `kind = param_fixture("kind", "local")` in one,
`kind = param_fixture("kind", "s3")` in the other, and the test imported there.
"""

from __future__ import annotations

import pytest


def param_fixture(name: str, *params):
    """A fixture `name` whose values are `params` (values or pytest.param(...)s, ids kept)."""
    @pytest.fixture(name=name, params=params)
    def fixture(request):
        return request.param
    return fixture
