"""The config-field table (btx_core/model/config_fields.py) covers every field of every dense config
class of the installed transformers; fields the MoE cannot represent refuse the seed, naming them."""

import json

import pytest
import transformers

from btx_core.errors import UnsupportedArchitectureError
from btx_core.model.config_fields import FIELDS, Carry, Drop, Only, Special
from btx_core.model.dense import inspect_model_dir
from btx_core.model.families import DENSE_FAMILIES, seed_architecture_problem
from btx_core.moe.mix import Expert, MixInputError, MixOptions, mix
from tests.pico import dense, save

CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config", "olmo2": "Olmo2Config"}


def test_every_family_has_a_table_and_a_config_class():
    assert set(FIELDS) == set(DENSE_FAMILIES) == set(CONFIG_CLASSES)


@pytest.mark.parametrize("family", sorted(CONFIG_CLASSES))
def test_every_field_of_the_dense_config_class_has_a_rule(family):
    fields = set(getattr(transformers, CONFIG_CLASSES[family])().to_dict())
    table = FIELDS[family]
    assert fields - set(table) == set(), "new fields: decide carry, drop (why) or refuse in config_fields.py"
    assert set(table) - fields == set(), "fields this transformers no longer has: remove them from the table"
    for key, rule in table.items():
        assert isinstance(rule, (Carry, Drop, Only, Special)), key
        if isinstance(rule, (Drop, Only, Special)):
            assert len(getattr(rule, "why")) > 10, f"{key}: give the reason"


@pytest.mark.parametrize("family", sorted(CONFIG_CLASSES))
def test_carried_fields_reach_the_moe_config(tmp_path, family):
    source = save(dense(family, tie=True, rms_norm_eps=3e-5, max_position_embeddings=96), tmp_path / "d")
    out = tmp_path / "moe"
    out.mkdir()
    mix([Expert("a", source), Expert("b", source)], MixOptions(), out)
    dense_config = json.loads((source / "config.json").read_text())
    moe = json.loads((out / "config.json").read_text())
    for key, rule in FIELDS[family].items():
        if isinstance(rule, Carry) and key in dense_config:
            expected = dense_config[key]
            if family == "qwen2" and key == "sliding_window" and not dense_config["use_sliding_window"]:
                expected = 0  # Qwen2MoeConfig's own spelling of "no window" (its __post_init__)
            for target in rule.to or (key,):
                assert moe.get(target) == expected, (key, target)
    assert moe["rms_norm_eps"] == 3e-5 and moe["max_position_embeddings"] == 96


ONLY = [(family, key, rule) for family, table in FIELDS.items() for key, rule in table.items()
        if isinstance(rule, Only) and key != "is_encoder_decoder"]


@pytest.mark.parametrize("family,key,rule", ONLY, ids=[f"{f}-{k}" for f, k, _ in ONLY])
def test_a_field_the_moe_cannot_hold_refuses_the_seed(tmp_path, family, key, rule):
    source = save(dense(family), tmp_path / "d")
    config = json.loads((source / "config.json").read_text())
    config[key] = not rule.value if isinstance(rule.value, bool) else "other"
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "moe"
    out.mkdir()
    with pytest.raises(MixInputError) as info:
        mix([Expert("a", source), Expert("b", source)], MixOptions(), out)
    assert key in str(info.value) and len(info.value.problems) == 1  # once, not once per copy
    assert list(out.iterdir()) == []
    with pytest.raises(UnsupportedArchitectureError, match=key):  # and when the seed is imported
        inspect_model_dir(str(source))


@pytest.mark.parametrize("fmt", ["t4", "t5"])
def test_a_rope_type_that_cannot_be_carried_refuses_the_seed(tmp_path, fmt):
    source = save(dense("llama", rope="linear"), tmp_path / "d", fmt=fmt)
    config = json.loads((source / "config.json").read_text())
    rope = config["rope_scaling"] if fmt == "t4" else config["rope_parameters"]
    rope["type" if "type" in rope else "rope_type"] = "proportional"
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "moe"
    out.mkdir()
    with pytest.raises(MixInputError, match="'proportional'"):
        mix([Expert("a", source), Expert("b", source)], MixOptions(), out)
    assert list(out.iterdir()) == []
    assert "'proportional'" in seed_architecture_problem(str(source))  # `btx validate`, before any work


def test_qwen3_with_both_attention_kinds_is_refused_and_all_sliding_is_carried(tmp_path):
    mixed_kinds = save(dense("qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=1),
                       tmp_path / "mixed")
    out = tmp_path / "moe"
    out.mkdir()
    with pytest.raises(MixInputError, match="layer_types mixes full_attention, sliding_attention"):
        mix([Expert("a", mixed_kinds), Expert("b", mixed_kinds)], MixOptions(), out)
    sliding = save(dense("qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=0),
                   tmp_path / "sliding")
    mix([Expert("a", sliding), Expert("b", sliding)], MixOptions(), out)
    moe = json.loads((out / "config.json").read_text())
    assert moe["use_sliding_window"] is True and moe["sliding_window"] == 16

