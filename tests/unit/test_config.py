"""The config schema: every shipped config loads; bad configs give one clear error each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from btx_core.config.load import load_config
from btx_core.config.packaged_seeds import find_packaged
from btx_core.config.schema import BTXConfig
from btx_core.errors import ConfigError

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_how_to_run_it(path, tmp_path, monkeypatch):
    if "btx fetch-seed" in path.read_text():  # its seed is a Hub id; offline, its header fetches a copy first
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # empty
        monkeypatch.setenv("BTX_CACHE_DIR", str(tmp_path / "btx"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        fetch = "`btx fetch-seed HuggingFaceTB/SmolLM2-135M-Instruct`"
        with pytest.raises(ConfigError, match=f"seed.model: .* {fetch}"):
            load_config(path)  # not fetched yet: the one problem, named with the command to run
        _fake_offline_copy("HuggingFaceTB/SmolLM2-135M-Instruct")
    config = load_config(path)
    assert isinstance(config, BTXConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run it:") and path.name in first


def _fake_offline_copy(hub_id: str) -> Path:
    """What `btx fetch-seed` leaves, as far as validation looks (config.json, written last)."""
    copy = find_packaged(hub_id).copy_dir()
    copy.mkdir(parents=True)
    (copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return copy


def test_the_real_seed_config_validates_on_a_fresh_clone_or_says_in_one_line_what_to_run(tmp_path):
    """`btx validate configs/real-seed.yaml` as a new user runs it, in a fresh home (no Hugging Face
    cache, no btx cache) and without network: with HF_HUB_OFFLINE unset the Hub id needs no network
    to validate; with it set, one line says what to run; after that, it validates offline too."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BTX_CACHE_DIR", "XDG_CACHE_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    env.update(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))

    def validate(**extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "btx_core.cli", "validate", "configs/real-seed.yaml"],
                              cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=120)

    online = validate()
    assert online.returncode == 0 and "valid" in online.stdout, online.stderr
    offline = validate(HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and offline.stdout == "", offline
    problems = [line for line in offline.stderr.splitlines() if line.startswith("  - ")]
    command = "run `btx fetch-seed HuggingFaceTB/SmolLM2-135M-Instruct` once"
    assert len(problems) == 1 and command in problems[0], offline.stderr
    copy = tmp_path / ".cache" / "btx" / "seeds" / find_packaged("smollm2-135m-instruct").copy_dir().name
    copy.mkdir(parents=True)
    (copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fetched = validate(HF_HUB_OFFLINE="1")
    assert fetched.returncode == 0 and "valid" in fetched.stdout, fetched.stderr


def test_shipped_configs_exist():
    assert {"demo.yaml", "ci.yaml"} <= {p.name for p in CONFIGS}


def _base() -> dict:
    return yaml.safe_load((Path(__file__).parents[2] / "configs" / "ci.yaml").read_text())


def _llama_dir(tmp_path, model_type):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(d)


def _set(raw, dotted, value):
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value


BAD = [
    # (case, mutation, field named in the message, words of the fix)
    ("unknown field", lambda r, t: _set(r, "expert_training.stepz", 3), "expert_training.stepz", "did you mean `steps`"),
    ("removed field", lambda r, t: r.setdefault("store_transfer", {}).update(first_wait_s=2), "store_transfer.first_wait_s", "botocore's adaptive mode"),
    ("negative steps", lambda r, t: _set(r, "expert_training.steps", -5), "expert_training.steps", "greater than 0"),
    ("zero batch", lambda r, t: _set(r, "seed.pretrain.batch_size", 0), "seed.pretrain.batch_size", "greater than 0"),
    ("both budgets", lambda r, t: _set(r, "expert_training.tokens", 1000), "expert_training", "exactly one of `steps` and `tokens`"),
    ("missing data path", lambda r, t: _set(r, "domains.0.data", {"path": str(t / "nope.jsonl")}), "domains[0].data.path", "does not exist"),
    ("unknown store scheme", lambda r, t: _set(r, "store", "ftp://host/x"), "store", "s3://bucket/prefix"),
    ("duplicate domains", lambda r, t: r["domains"].append(dict(r["domains"][0])), "domains", "unique name"),
    ("no domains", lambda r, t: _set(r, "domains", []), "domains", "at least 1"),
    ("two data sources", lambda r, t: _set(r, "domains.0.data", {"builtin": "math", "hub": "x/y"}), "domains[0].data", "exactly one of"),
    ("unknown builtin", lambda r, t: _set(r, "domains.0.data", {"builtin": "poetry"}), "domains[0].data.builtin", "'code'"),
    ("bad domain name", lambda r, t: _set(r, "domains.0.name", "Math Domain"), "domains[0].name", "lowercase"),
    ("held-out fraction 1", lambda r, t: _set(r, "domains.0.held_out_fraction", 1.0), "domains[0].held_out_fraction", "less than 1"),
    ("bad precision", lambda r, t: _set(r, "expert_training.precision", "fp8"), "expert_training.precision", "'bf16'"),
    ("secret in storage options", lambda r, t: _set(r, "domains.0.data", {"path": "s3://b/x", "storage_options": {"secret": "s3cr3t"}}),
     "domains[0].data.storage_options", "environment"),
    ("unsupported architecture", lambda r, t: r.update(seed={"model": _llama_dir(t, "gpt2")}), "seed.model", "'gpt2' model"),
    ("seed without a kind", lambda r, t: r.update(seed={}), "seed", "exactly one of `model`"),
    ("missing run name", lambda r, t: r.pop("run_name"), "run_name", "missing"),
    ("wrong type", lambda r, t: _set(r, "expert_training.lr", "fast"), "expert_training.lr", "valid number"),
    ("held-out leak", lambda r, t: _set(r, "domains.1.held_out_fraction", 0.3), "domains[1].held_out_fraction",
     "above seed.held_out_fraction"),
    ("credentials in store URL", lambda r, t: _set(r, "store", "s3://AKIA:s3cr3t@bucket/x"), "store", "environment"),
    ("authorization header", lambda r, t: _set(r, "domains.0.data", {"path": "s3://b/x", "storage_options": {
        "headers": {"Authorization": "Bearer x"}}}), "domains[0].data.storage_options", "environment"),
    ("heads do not divide", lambda r, t: _set(r, "seed.create.num_kv_heads", 3), "seed.create", "divisible by num_kv_heads"),
]


@pytest.mark.parametrize("case,mutate,field,fix", BAD, ids=[b[0] for b in BAD])
def test_bad_config_gives_one_clear_error(tmp_path, monkeypatch, case, mutate, field, fix):
    monkeypatch.chdir(tmp_path)
    raw = _base()
    mutate(raw, tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1, info.value.problems
    problem = info.value.problems[0]
    assert problem.startswith(field + ":") or problem.startswith(field + " "), problem
    assert fix in problem, problem
    assert not (tmp_path / "store").exists()


def test_every_problem_is_reported_at_once(tmp_path):
    raw = _base()
    raw["expert_training"]["stepz"] = 1
    raw["seed"]["pretrain"]["lr"] = -1
    raw["store"] = "gopher://x"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    fields = sorted(p.split(":")[0] for p in info.value.problems)
    assert fields == ["expert_training.stepz", "seed.pretrain.lr", "store"]


def test_cross_field_and_path_problems_are_not_hidden_by_field_errors(tmp_path):
    raw = _base()
    raw["expert_training"]["stepz"] = 1                                 # a field error ...
    raw["expert_training"].pop("steps")                                  # ... beside a cross-field one
    raw["seed"]["pretrain"]["lr"] = -1
    raw["seed"]["pretrain"]["tokens"] = 10                               # both budgets, beside a bad lr
    raw["domains"][0]["data"] = {"path": str(tmp_path / "missing.jsonl")}  # and a world problem
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    fields = sorted(p.split(":")[0] for p in info.value.problems)
    assert fields == ["domains[0].data.path", "expert_training", "expert_training.stepz",
                      "seed.pretrain", "seed.pretrain.lr"], info.value.problems


def test_relative_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    raw = _base()
    raw["domains"][0]["data"] = {"path": "corpus.txt"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    assert config.domains[0].data.path == str(tmp_path / "corpus.txt")
    assert config.store == str(tmp_path / "store")


def test_token_budget_becomes_steps():
    settings = load_config(CONFIGS[0], check_environment=False).expert_training
    budget = settings.model_copy(update={"steps": None, "tokens": settings.tokens_per_step * 10 + 1})
    assert budget.total_steps() == 11
    assert budget.total_steps(world_size=2) == 6


def test_result_hash_ignores_bookkeeping_fields():
    settings = load_config(CONFIGS[0], check_environment=False).expert_training
    assert settings.result_hash() == settings.model_copy(update={"checkpoint_every": 7, "threads": 1}).result_hash()
    assert settings.result_hash() != settings.model_copy(update={"lr": 0.5}).result_hash()

