"""The MiX stage of a pipeline run: trained experts in the store (local and S3) -> a Mixtral in
the store with manifest and lineage; sparse upcycling; the `btx mix` / `btx upcycle` commands."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from btx_core.config.load import parse_config
from btx_core.errors import BTXError, IntegrityError
from btx_core.moe.mix import MixOptions
from btx_core.stages.common import open_store
from btx_core.stages.expert import train_expert
from btx_core.stages.mix import mix_stage
from btx_core.stages.mix_dirs import experts_from_dirs, mix_dirs, samples_from_paths
from btx_core.stages.seed import build_seed
from btx_core.store import layout
from tests.integration.test_cli_e2e import btx
from tests.unit.test_model_card import hub_accepts

ROOT = Path(__file__).parents[2]


def ci_config(store: str, cache: Path, domains: int = 3, **mix):
    raw = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    raw.update(store=store, cache_dir=str(cache), mix=mix, domains=raw["domains"][:domains])
    return parse_config(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A local store with the CI seed and all three experts."""
    work = tmp_path_factory.mktemp("mixrun")
    config = ci_config(str(work / "store"), work / "cache", router_init="centroid", sample_blocks=8)
    with pytest.raises(BTXError, match="btx seed CONFIG"):
        mix_stage(config)
    build_seed(config)
    with pytest.raises(BTXError, match="btx train-expert CONFIG --domain math"):
        mix_stage(config)  # nothing written before the experts exist
    assert not open_store(config).is_complete(layout.mix_model(config.run_root))
    for d in config.domains:
        train_expert(config, d.name)
    return work, config


def test_mix_stage_writes_a_mixtral_with_lineage_and_routing_report(trained):
    work, config = trained
    out = mix_stage(config)
    assert not out.skipped and out.location == layout.mix_model(config.run_root)
    store = open_store(config)
    experts = {f"expert:{d}": store.read_manifest(layout.expert_model(config.run_root, d)).hash
               for d in ("math", "code", "knowledge")}
    seed = store.read_manifest(layout.seed_model(config.run_root))
    assert out.manifest.inputs == {**experts, "expert:seed": seed.hash,
                                   **{k: v for k, v in out.manifest.inputs.items() if k.startswith("data:")}}
    assert sorted(k for k in out.manifest.inputs if k.startswith("data:")) == ["data:code", "data:knowledge", "data:math"]
    routing = out.metrics["routing"]
    assert routing["experts"] == ["math", "code", "knowledge", "seed"] and routing["init"] == "centroid"
    assert len(routing["entropy"]) == 2 and all(0 < h < 1.386 for h in routing["entropy"])
    # Trained experts on real domain text: the centroid router sends most of a domain's tokens to
    # its own expert (chance: 1/4), though not all (a 20-step pico seed; no router bias).
    for layer in range(2):
        own = [routing["by_domain_top1"][d][layer][i] for i, d in enumerate(("math", "code", "knowledge"))]
        assert sum(own) / 3 > 0.5, routing["by_domain_top1"]
    path = Path(out.location)
    card = (path / "README.md").read_text()
    for value in [*experts.values(), seed.hash]:
        assert value[:16] in card
    meta = hub_accepts(card)  # a seed the run made: no Hub id, so no base_model; its store path under btx
    assert "base_model" not in meta and meta["btx"]["lineage"]["seed"] == layout.seed_model(config.run_root)
    assert "## Recipe" in card and "| expert math | math |" in card and "| seed (pretrained) | general |" in card
    # What the merge cost, measured in the same stage: in the manifest, the card and the command's notes.
    cost = out.metrics["merge_cost"]
    assert set(cost["losses"]) == {"math", "code", "knowledge"} and set(cost["distances"]["experts"]) == {
        "math", "code", "knowledge", "seed"}
    assert cost["settings"]["mix.router_init"] == "centroid" and cost["settings"]["branch.train"] == "all"
    assert "## What the merge cost" in card and "| attention |" in card
    assert any(n.startswith("merge cost (held-out loss") for n in out.notes)
    assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, MixtralForCausalLM) and model.config.num_local_experts == 4
    assert model.config.router_aux_loss_coef == pytest.approx(0.01 * 2)
    assert mix_stage(config).skipped  # same config and inputs: no work


def test_btx_mix_and_upcycle_commands_on_the_run(trained):
    work, config = trained
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = btx("upcycle", str(path), cwd=work)
    assert "upcycle: done" in out.stdout and "routing entropy at init" in out.stdout
    upcycled = Path(layout.upcycle_model(config.run_root))
    model = AutoModelForCausalLM.from_pretrained(upcycled)
    assert model.config.btx_expert_names == ["copy0", "copy1", "copy2", "copy3"]
    status = btx("status", str(path), cwd=work).stdout
    assert "upcycle" in status and "complete" in status


def test_a_corrupt_expert_shard_stops_the_mix_before_it_writes(trained, tmp_path):
    work, config = trained
    other = ci_config(str(work / "store"), work / "cache", include_seed=False, top_k=1)
    weights = Path(layout.expert_model(config.run_root, "code")) / "model.safetensors"
    original = weights.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    try:
        with pytest.raises(IntegrityError, match="model.safetensors is corrupt"):
            mix_stage(other)
    finally:
        weights.write_bytes(original)
    assert mix_stage(other).manifest.metrics["experts"] == ["math", "code", "knowledge"]


def test_btx_mix_experts_from_anywhere_and_drop_one(trained, tmp_path):
    work, config = trained
    dirs = [layout.expert_model(config.run_root, d) for d in ("math", "code")] + [layout.seed_model(config.run_root)]
    out = tmp_path / "moe"
    result = btx("mix", *[a for d in dirs for a in ("--expert", d)], "--name", "math", "--name", "code",
                 "--name", "seed", "--out", str(out), "--exclude-from-merge", "seed", "--router-init", "zeros",
                 "--base", layout.seed_model(config.run_root), cwd=work)
    assert "mix: done" in result.stdout and (out / "_manifest.json").is_file()
    assert "attention: distance from the seed math" in result.stdout  # the merge cost, from --base
    lineage = (out / "README.md").read_text()
    assert all(d in lineage for d in dirs)
    experts = experts_from_dirs(dirs, ["math", "code", "seed"])  # what the command does
    assert all(e.manifest_hash and e.manifest_hash[:16] in lineage for e in experts)
    options = MixOptions(shared_exclude=("seed",), router_init="zeros")
    assert mix_dirs(experts, str(out), options, base=Path(layout.seed_model(config.run_root))).skipped  # no work
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    with pytest.raises(BTXError, match="not a complete btx output"):
        mix_dirs(experts, str(notes), options)
    assert (notes / "keep.txt").read_text() == "mine"
    dropped = btx("moe", "drop-expert", str(out), "--expert", "code", "--out", str(tmp_path / "small"), cwd=work)
    assert "experts now: math, seed" in dropped.stdout
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(small(ids).logits).all()
    assert json.loads((tmp_path / "small" / "config.json").read_text())["num_local_experts"] == 2


def test_bad_flags_fail_with_the_fix_and_write_nothing(trained, tmp_path):
    work, config = trained
    expert = layout.expert_model(config.run_root, "math")
    bad = btx("mix", "--expert", expert, "--expert", expert, "--name", "a", "--name", "b", "--top-k", "7",
              "--weight", "a", "--out", str(tmp_path / "bad"), cwd=work, check=False)
    assert bad.returncode == 1 and "NAME=WEIGHT" in bad.stderr and not (tmp_path / "bad").exists()


def test_mix_stage_on_s3(s3_root, tmp_path):
    config = ci_config(s3_root, tmp_path / "cache", domains=2, include_seed=False, top_k=1, shard_size="100KB")
    build_seed(config)
    for d in config.domains:
        train_expert(config, d.name)
    out = mix_stage(config)
    assert out.location.startswith("s3://") and "model.safetensors.index.json" in out.manifest.files
    local = open_store(config).fetch(out.location, tmp_path / "fetched")  # every sha256 checked
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 1
    assert out.metrics["routing"]["init"] == "centroid"  # the default, from the domains' text on S3


def test_centroid_init_from_text_files_for_experts_trained_anywhere(trained, tmp_path):
    work, config = trained
    dirs = [layout.expert_model(config.run_root, d) for d in ("math", "code")] + [layout.seed_model(config.run_root)]
    math_docs = [f"Problem: {a} + {b} = ? Answer: {a + b}." for a in range(40) for b in range(3)]
    code_docs = [f"def f{i}(x):\n    return x * {i} + len(str(x))\n" for i in range(120)]
    for name, docs in (("math", math_docs), ("code", code_docs)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    experts = experts_from_dirs(dirs, ["math", "code", "seed"])
    samples = samples_from_paths(experts, [str(tmp_path / "math.jsonl"), str(tmp_path / "code.jsonl"), "-"],
                                 seq_len=32, count=8)
    assert samples.centroid["seed"] is None and set(samples.heldout) == {"math", "code"}
    out = mix_dirs(experts, str(tmp_path / "moe"), MixOptions(router_init="centroid"), samples=samples)
    routing = out.metrics["routing"]
    assert routing["init"] == "centroid" and set(routing["by_domain_top1"]) == {"math", "code"}
    losses = out.metrics["merge_cost"]["losses"]  # oracle-routed losses from --data; no --base, no distances
    assert set(losses) == {"math", "code"} and "distances" not in out.metrics["merge_cost"]
    with pytest.raises(BTXError, match="one --data per expert"):
        samples_from_paths(experts, [str(tmp_path / "math.jsonl")], seq_len=32, count=8)

