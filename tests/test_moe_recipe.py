"""The mergekit-moe recipe schema: defaults, and one readable error naming the key for each mistake."""

from __future__ import annotations

import pytest
import torch

from moemerge.config.moe_recipe import load_moe_recipe, parse_moe_recipe
from moemerge.errors import ConfigError


def recipe(**overrides: object) -> dict:
    base = {
        "base_model": "models/base",
        "experts": [
            {"source_model": "models/coder", "positive_prompts": ["def f():"]},
            {"source_model": "models/math", "positive_prompts": ["1 + 2"], "negative_prompts": ["def"]},
        ],
    }
    return {**base, **overrides}


def test_defaults_follow_mergekit_moe():
    parsed = parse_moe_recipe(recipe())
    assert parsed.gate_mode == "hidden"
    assert parsed.experts_per_token == 2
    assert parsed.architecture is None and parsed.dtype is None and parsed.torch_dtype is None
    assert parsed.shared_experts == []
    assert parsed.experts[0].noise == 0.0 and parsed.experts[0].residual_scale == 1.0
    assert parsed.experts[1].negative_prompts == ["def"]


def test_full_recipe_parses_with_every_key():
    parsed = parse_moe_recipe(
        recipe(
            architecture="qwen2_moe",
            gate_mode="cheap_embed",
            dtype="bfloat16",
            experts_per_token=1,
            shared_experts=[{"source_model": "models/base", "positive_prompts": ["hi"], "residual_scale": 0.5}],
        )
    )
    assert parsed.torch_dtype == torch.bfloat16
    assert parsed.shared_experts[0].residual_scale == 0.5


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"experts_per_tok": 2}, "'experts_per_tok' is not a mergekit-moe key"),
        (
            {"experts": [{"source_model": "m", "positive_prompts": ["p"], "nosie": 0.1}]},
            "'experts[0].nosie' is not a mergekit-moe key",
        ),
        ({"gate_mode": "learned"}, "'gate_mode'"),
        ({"architecture": "deepseek_v3"}, "'architecture'"),
        ({"dtype": "int8"}, "'dtype'"),
        ({"experts_per_token": 3}, "experts_per_token is 3 but only 2 experts"),
        ({"experts_per_token": 0}, "'experts_per_token'"),
        ({"experts": []}, "'experts'"),
        ({"experts": [{"source_model": "m", "positive_prompts": ["p"], "noise": -1}]}, "'experts[0].noise'"),
        ({"experts": [{"source_model": "m"}], "experts_per_token": 1}, "experts[0].positive_prompts"),
        (
            {"gate_mode": "cheap_embed", "experts": [{"source_model": "m"}], "experts_per_token": 1},
            "gate_mode 'cheap_embed' needs at least one positive prompt",
        ),
    ],
)
def test_mistakes_name_the_key(overrides: dict, expected: str):
    with pytest.raises(ConfigError) as error:
        parse_moe_recipe(recipe(**overrides))
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_missing_base_model_is_named():
    data = recipe()
    del data["base_model"]
    with pytest.raises(ConfigError, match="'base_model' is required"):
        parse_moe_recipe(data)


def test_random_gates_need_no_prompts():
    parsed = parse_moe_recipe(
        {"base_model": "b", "gate_mode": "random", "experts": [{"source_model": "x"}, {"source_model": "y"}]}
    )
    assert [e.positive_prompts for e in parsed.experts] == [[], []]


def test_load_rejects_non_mapping_and_bad_yaml(tmp_path):
    listing = tmp_path / "list.yml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_moe_recipe(listing)
    broken = tmp_path / "broken.yml"
    broken.write_text("base_model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_moe_recipe(broken)
    with pytest.raises(ConfigError, match="cannot read recipe .*absent.yml"):
        load_moe_recipe(tmp_path / "absent.yml")


@pytest.mark.parametrize("spelling", ["deepseek", "DeepSeek MoE", "glm4_moe"])
def test_mergekit_deepseek_output_is_read_as_glm4_moe_with_several_shared_experts(spelling: str):
    shared = [{"source_model": "a"}, {"source_model": "b", "residual_scale": 0.5}, {"source_model": "c"}]
    parsed = parse_moe_recipe(recipe(architecture=spelling, shared_experts=shared))
    assert parsed.architecture == "glm4_moe"
    assert [entry.source_model for entry in parsed.shared_experts] == ["a", "b", "c"]
