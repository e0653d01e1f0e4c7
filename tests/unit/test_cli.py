"""The `btx` command's surface: its version and the commands it offers, in this process."""

from __future__ import annotations

from importlib.metadata import version

from typer.testing import CliRunner

from btx_core.cli.main import app

COMMANDS = ["validate", "seed", "train-expert", "run", "status", "fetch-seed", "mix", "upcycle", "finetune",
            "eval", "compare", "ablate", "moe"]


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


def test_the_first_progress_rate_is_the_loops_pace_not_ten_steps_over_a_millisecond(capsys):
    """The training loop reports every `log_every` steps: the bar's first update jumps 10 steps at
    once, which tqdm used to show as tens of thousands of steps/s. It must show the loop's pace."""
    from btx_core.cli.progress import ProgressBar
    from btx_core.training.loop import Progress

    bar = ProgressBar("expert[math]")
    bar(Progress(step=10, total_steps=110, loss=5.0, lr=1e-3, tokens_per_s=2048.0, eta_s=50.0, resumed_from=0))
    rate = bar.bar.format_dict["rate"] or bar.bar.n / bar.bar.format_dict["elapsed"]
    assert 1.5 <= rate <= 2.5, rate  # 100 steps left in 50 s: 2 steps/s
    bar(Progress(step=20, total_steps=110, loss=4.0, lr=1e-3, tokens_per_s=2048.0, eta_s=45.0, resumed_from=0))
    assert bar.bar.format_dict["rate"] is None or bar.bar.format_dict["rate"] < 100
    bar.close()


def test_a_finished_stage_bar_stops_its_clock_and_the_next_stage_takes_its_line(capsys):
    """In `btx run` the prose expert's bar, done in 1:45, went on being redrawn under the next
    branch's log lines as 30/30 [09:00, 17.8 s/step]: its clock ran on while the code expert trained."""
    import time

    from tqdm import tqdm

    from btx_core.cli.progress import StageBars
    from btx_core.training.loop import Progress

    bars = StageBars()
    first = bars("expert[prose]")
    first(Progress(step=10, total_steps=20, loss=5.0, lr=1e-3, tokens_per_s=100.0, eta_s=0.1, resumed_from=0))
    first(Progress(step=20, total_steps=20, loss=4.0, lr=1e-3, tokens_per_s=100.0, eta_s=0.0, resumed_from=0))
    second = bars("expert[code]")
    second(Progress(step=10, total_steps=20, loss=5.0, lr=1e-3, tokens_per_s=100.0, eta_s=5.0, resumed_from=0))
    assert second.position == 0  # the line under the finished bar, not one more down
    capsys.readouterr()
    time.sleep(1.2)
    tqdm.write("a log line while the code expert trains")  # tqdm redraws every open bar around it
    redrawn = capsys.readouterr()
    assert "expert[code]" in redrawn.err and "expert[prose]" not in redrawn.err + redrawn.out
    bars.close()



def test_verbose_shows_the_libraries_request_logs_and_passes_it_on(monkeypatch):
    """`btx -v` is BTX_LOG_LEVEL=DEBUG: set in the environment for the processes a run starts,
    and the request loggers that a quiet console holds at WARNING opened up."""
    import logging
    import os
    from pathlib import Path

    from btx_core.logs import CHATTY, quiet_libraries

    monkeypatch.setenv("BTX_LOG_LEVEL", "INFO")
    quiet_libraries()
    assert logging.getLogger("httpx").level == logging.WARNING
    root = logging.getLogger().level
    try:
        result = CliRunner().invoke(app, ["-v", "validate", str(Path(__file__).parents[2] / "configs" / "ci.yaml")])
        assert result.exit_code == 0, result.output
        assert os.environ["BTX_LOG_LEVEL"] == "DEBUG"
        assert all(logging.getLogger(name).level == logging.DEBUG for name in CHATTY)
    finally:
        logging.getLogger().setLevel(root)
        monkeypatch.setenv("BTX_LOG_LEVEL", "INFO")
        quiet_libraries()


def test_quiet_model_loads_turns_off_transformers_bars_and_keeps_the_hubs_downloads(monkeypatch):
    """A command that loads models hides transformers' per-model bars (the integration test of
    `btx finetune`/`btx eval` reads their stderr); a seed downloaded from the Hub still shows its bar."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from btx_core.logs import quiet_model_loads

    monkeypatch.setenv("BTX_LOG_LEVEL", "INFO")
    downloads_hidden = hub_utils.are_progress_bars_disabled()  # HF_HUB_DISABLE_PROGRESS_BARS may be set
    try:
        quiet_model_loads()
        assert not hf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled() == downloads_hidden
        hf_logging.enable_progress_bar()
        monkeypatch.setenv("BTX_LOG_LEVEL", "DEBUG")  # `btx -v` shows everything
        quiet_model_loads()
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_compare_seeds_overrides_the_configs_and_refuses_a_bad_list(monkeypatch, tmp_path):
    """One seed per command keeps each under the CI machine's limits; a later run over all reuses them."""
    from pathlib import Path

    import btx_core.stages.compare as compare_module

    seen = []

    def fake_compare(config, *, out_dir, stage):
        seen.append(config.compare.seeds)
        (out_dir / "results.md").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.md").write_text("table")
        return {"wall_s": 1.0, "location": "store"}

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    ci = str(Path(__file__).parents[2] / "configs" / "ci.yaml")
    out = ["--out", str(tmp_path)]
    assert CliRunner().invoke(app, ["compare", ci, *out]).exit_code == 0
    assert CliRunner().invoke(app, ["compare", ci, "--seeds", "1,2", *out]).exit_code == 0
    assert seen == [[0], [1, 2]]
    for bad in ("one", "1,1", ","):
        result = CliRunner().invoke(app, ["compare", ci, "--seeds", bad, *out])
        assert result.exit_code == 2 and "distinct integer seeds" in result.output, result.output
    assert len(seen) == 2  # nothing ran for a bad list
