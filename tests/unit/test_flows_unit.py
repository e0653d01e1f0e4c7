"""The flows' pure parts: artifact keys, report tables, figures, the orchestration config."""

import io
from pathlib import Path

import pytest
import yaml

from btx_core.config.load import parse_config
from btx_core.errors import ConfigError

ROOT = Path(__file__).parents[2]


def ci_raw() -> dict:
    return yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())


def png_of(png: bytes):
    from PIL import Image

    assert png.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(png))


def test_artifact_keys_are_lowercase_letters_digits_and_dashes():
    from flows.progress import artifact_key

    assert artifact_key("My_Run", "expert", "code_py", "progress") == "my-run-expert-code-py-progress"
    assert artifact_key("ci", "evaluation") == "ci-evaluation"
    assert artifact_key("a--b_", "--c") == "a-b-c"
    with pytest.raises(ValueError):
        artifact_key("__", "")


def test_orchestration_defaults_and_checks():
    cfg = parse_config(ci_raw())
    o = cfg.orchestration
    assert (o.expert_runner, o.expert_pool, o.retries, o.retry_delay_s) == ("local", "btx-experts", 3, 10.0)
    raw = ci_raw()
    raw["orchestration"] = {"domain_pools": {"math": "gpu-a100", "maths": "x"}}
    with pytest.raises(ConfigError, match=r"orchestration: domain_pools names unknown domain\(s\) maths; "
                                          r"the domains are: math, code, knowledge"):
        parse_config(raw)
    raw["orchestration"] = {"domain_pools": {"math": "a/b"}, "expert_runner": "k8s", "retries": -1}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "'a/b' are not valid" in text and "expert_runner" in text and "retries" in text


def test_orchestration_does_not_change_what_a_stage_computes():
    from btx_core.stages.expert import expert_config_hash

    raw = ci_raw()
    base = parse_config(raw)
    raw["orchestration"] = {"expert_runner": "deployments", "domain_pools": {"math": "gpu"}, "retries": 0}
    moved = parse_config(raw)
    assert expert_config_hash(base, "math") == expert_config_hash(moved, "math")


def test_routing_heatmap_from_the_mix_stage_metrics():
    from btx_core.evaluation.plots import routing_load_png

    routing = {"experts": ["seed", "math", "code", "knowledge"], "entropy": [1.2, 0.9, 0.4],
               "load": [[0.25, 0.25, 0.25, 0.25], [0.1, 0.6, 0.2, 0.1], [0.0, 0.05, 0.9, 0.05]]}
    image = png_of(routing_load_png(routing))
    assert image.size[0] > 200 and image.size[1] > 100
    pixels = image.convert("RGB")
    assert len(pixels.getcolors(maxcolors=1 << 20)) > 50  # a drawn heatmap, not a blank canvas


@pytest.mark.parametrize("broken, message", [
    ({"experts": ["a", "b"], "entropy": [1.0], "load": [[0.5, 0.3, 0.2]]}, "layer 0 has 3 load values for 2 experts"),
    ({"experts": ["a", "b"], "entropy": [1.0, 2.0], "load": [[0.5, 0.5]]}, "2 entropy values for 1 layers"),
    ({"experts": ["a", "b"], "entropy": [1.0], "load": [[0.5, float("nan")]]}, "negative or not finite"),
    ({"experts": ["a"], "load": [[1.0]]}, "must have `experts`, `entropy` and `load`"),
])
def test_routing_heatmap_names_what_is_wrong(broken, message):
    from btx_core.evaluation.plots import routing_load_png

    with pytest.raises(ValueError, match=message):
        routing_load_png(broken)


def test_loss_curves_need_data():
    from btx_core.evaluation.plots import loss_curves_png

    assert png_of(loss_curves_png({"seed": [6.0, 5.5, 5.2], "expert[math]": [5.0, 4.1]})).size[0] > 200
    with pytest.raises(ValueError, match="no loss curves"):
        loss_curves_png({"seed": []})


def test_report_tables_from_manifests(tmp_path):
    from btx_core.store.manifest import Manifest
    from flows.report import (
        StageRecord,
        checkpoints_markdown,
        compute_rows,
        evaluation_rows,
        merge_cost_markdown,
        routing_markdown,
        stage_locations,
    )

    raw = ci_raw()
    raw["store"] = str(tmp_path / "store")
    cfg = parse_config(raw)

    def record(name, location, metrics, checkpoints=()):
        m = Manifest(stage=name, created_at="2026-11-01T00:00:00+00:00", config_hash="x", files={}, metrics=metrics)
        return StageRecord(name, location, m, list(checkpoints))

    rows = stage_locations(cfg)
    records = [record("seed", rows[0][1], {"steps": 20, "tokens": 5120, "wall_s": 3.14159, "tokens_per_s": 1629.7},
                      [(20, rows[0][2] + "/step-00000020")])]
    records += [record(name, loc, {"seed_heldout_loss": 6.0, "heldout_loss": 5.5 - i, "steps": 12})
                for i, (name, loc, _) in enumerate(rows[1:4])]
    records.append(StageRecord("mix", rows[4][1], None, []))
    evaluation = evaluation_rows(cfg, records)
    assert evaluation[0] == {"domain": "math", "seed_heldout_loss": 6.0, "expert_heldout_loss": 5.5, "change": -0.5}
    assert [r["change"] for r in evaluation] == [-0.5, -1.5, -2.5]
    compute = compute_rows(records)
    assert [r["stage"] for r in compute] == ["seed", "expert[math]", "expert[code]", "expert[knowledge]"]
    assert compute[0] == {"stage": "seed", "steps": 20, "tokens": 5120, "train_flops": None, "wall_s": 3.14,
                          "tokens_per_s": 1629.7}
    markdown = checkpoints_markdown(cfg, records)
    assert f"[{rows[0][1]}](file://{rows[0][1]})" in markdown and "step 20: " in markdown
    assert "| mix |" not in markdown  # nothing in the store yet
    assert routing_markdown(cfg, records) is None
    assert merge_cost_markdown(cfg, records) is None  # no MiX yet
    cost = {"settings": {"branch.train": "ffn"}, "tokens_per_domain": {"math": 512},
            "losses": {"math": {"expert": 2.0, "oracle": 2.5, "mix": 3.25}}}
    records[-1] = record("mix", rows[4][1], {"routing": {"experts": ["a", "b"], "entropy": [0.6],
                                                         "load": [[0.7, 0.3]]}, "merge_cost": cost})
    assert "data:image/png;base64," in routing_markdown(cfg, records)
    merge = merge_cost_markdown(cfg, records)
    assert "| math | 2.0000 | 2.5000 | 3.2500 | +0.5000 | +0.7500 |" in merge and "`branch.train: ffn`" in merge


def btx_routing(layers: int = 5) -> dict:
    """An evaluated MoE's routing (btx_core/evaluation/scores.py): math and code mostly to their own experts."""
    experts, domains = ["math", "code", "seed"], ["math", "code"]
    top1 = {d: [[0.8 - 0.1 * (layer % 2) if e == d else (0.2 + 0.1 * (layer % 2)) / 2 for e in experts]
                for layer in range(layers)] for d in domains}
    return {"experts": experts, "top_k": 2, "by_domain_top1": top1, "by_domain_topk": top1,
            "load": [[0.4, 0.4, 0.2]] * layers, "entropy": [0.7] * layers}


def test_routing_per_domain_by_layer_group():
    from btx_core.evaluation.plots import routing_by_domain_png
    from btx_core.evaluation.report import layer_groups, routing_by_group, routing_groups_markdown

    assert layer_groups(5) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert layer_groups(2) == [range(0, 1), range(1, 2)] and layer_groups(32, 4)[-1] == range(24, 32)
    routing = btx_routing()
    groups = routing_by_group(routing)
    assert list(groups) == ["layers 0-1", "layer 2", "layer 3", "layer 4"]
    # Layers 0 (0.8 to math) and 1 (0.7) averaged; rows are domains, columns experts.
    assert groups["layers 0-1"][0] == pytest.approx([0.75, 0.125, 0.125])
    assert groups["layer 3"][1] == pytest.approx([0.15, 0.7, 0.15])
    tables = routing_groups_markdown(routing)
    assert "**Layers 0-1**" in tables and "| Domain | math | code | seed |" in tables
    assert "| math | 75% | 12% | 12% |" in tables and "| code | 15% | 70% | 15% |" in tables
    image = png_of(routing_by_domain_png(routing, title="per domain"))
    assert image.size[0] > 4 * 150  # four panels side by side
    with pytest.raises(ValueError, match="3 experts"):
        routing_by_group({**routing, "experts": ["a", "b", "c"], "by_domain_top1": {"math": [[1.0, 0.0]]}})


def test_routing_artifact_and_report_show_each_domains_tokens(tmp_path):
    from btx_core.store.manifest import Manifest
    from flows.report import StageRecord, moe_routing, report_markdown, routing_markdown, stage_locations

    raw = ci_raw()
    raw["store"] = str(tmp_path / "store")
    cfg = parse_config(raw)
    mix = Manifest(stage="mix", created_at="2026-11-01T00:00:00+00:00", config_hash="x", files={},
                   metrics={"routing": {"experts": ["a", "b"], "entropy": [0.6], "load": [[0.7, 0.3]]}})
    records = [StageRecord(name, location, mix if name == "mix" else None, [])
               for name, location, _ in stage_locations(cfg)]
    assert moe_routing(records, None)[1] == "MiX at initialisation"
    results = {"routing": {"btx-mix": {"single": btx_routing(2)}, "btx": {"single": btx_routing(4)}}}
    routing, which = moe_routing(records, results)
    assert which == "BTX after finetuning" and len(routing["load"]) == 4
    markdown = routing_markdown(cfg, records, results)
    assert "routing per domain (BTX after finetuning)" in markdown
    assert markdown.count("![routing per domain](data:image/png;base64,") == 1
    assert all(f"**Layer {i}**" in markdown for i in range(4))  # 4 layers: a group each
    assert "| Layer | math tokens -> expert math | code tokens -> expert code | Least-used expert |" in markdown
    report = report_markdown(cfg, records, None, {}, markdown.replace("# ", "## ", 1))
    assert "## ci: routing per domain" in report

