"""The recipe schema: mergekit's keys accepted, everything else refused with the key named."""

from __future__ import annotations

import pytest
import torch

from moemerge.config.merge_recipe import Conditional, load_merge_recipe
from moemerge.errors import ConfigError


def test_models_recipe_with_gradient_and_filters(write_recipe):
    path = write_recipe(
        {
            "merge_method": "ties",
            "base_model": "a",
            "models": [{"model": "b", "parameters": {"weight": [0.1, 0.9], "density": 0.5}}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
            "dtype": "bfloat16",
        }
    )
    recipe, text = load_merge_recipe(path)
    assert recipe.models[0].parameters["weight"] == [0.1, 0.9]
    assert isinstance(recipe.parameters["t"][0], Conditional)
    assert recipe.math_dtype == torch.bfloat16 and recipe.saved_dtype == torch.bfloat16
    assert "ties" in text


def test_out_dtype_overrides_saved_dtype(write_recipe):
    path = write_recipe({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float32", "out_dtype": "fp16"})
    recipe, _ = load_merge_recipe(path)
    assert recipe.math_dtype == torch.float32 and recipe.saved_dtype == torch.float16


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {"merge_method": "linear", "modles": [{"model": "a"}]},
            "modles: unknown key (did you mean 'modules' or 'models'?)",
        ),
        ({"merge_method": "linear"}, "exactly one of 'models', 'slices' or 'modules'"),
        ({"models": [{"model": "a"}]}, "merge_method: required key is missing"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float17"}, "unknown dtype 'float17'"),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"tokens": {"<x>": {"source": 3}}}},
            "tokenizer.tokens.<x>.source",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]},
            "slices[0].sources[0].layer_range",
        ),
        (
            {
                "merge_method": "slerp",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
            },
            "same number of layers",
        ),
        ({"merge_method": "linear", "models": [{"model": "a+lora+more"}]}, "MODEL+LORA_ADAPTER"),
    ],
)
def test_bad_recipes_name_the_key(write_recipe, recipe, message):
    with pytest.raises(ConfigError) as error:
        load_merge_recipe(write_recipe(recipe))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_yaml_names_the_line(write_recipe):
    with pytest.raises(ConfigError, match="line 3: not valid YAML"):
        load_merge_recipe(write_recipe("merge_method: linear\nmodels: [\n  - {model: a\n"))
