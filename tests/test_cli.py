"""The `btx` command's surface: its version and the commands it offers, in this process."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from btx_core.cli.main import app

pytestmark = pytest.mark.unit
COMMANDS = ["validate", "seed", "train-expert", "run", "status", "mix", "upcycle", "finetune", "eval",
            "compare", "ablate", "moe"]


def test_version_is_the_installed_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"btx {version('btx')}"


def test_every_command_is_registered_once_in_the_order_of_the_pipeline():
    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    names += [g.name for g in app.registered_groups]
    assert names == COMMANDS
    drop = CliRunner().invoke(app, ["moe", "drop-expert", "--help"])
    assert drop.exit_code == 0 and "--expert" in drop.output
