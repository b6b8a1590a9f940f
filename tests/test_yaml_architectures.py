"""Dense merges on the other architectures in the table, loaded and run with transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_tensors
from transformers import AutoModelForCausalLM

from moemerge.toys import make_toy_model


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    models = {}
    for model_type in ("qwen3", "gemma2", "phi3", "qwen2"):
        base = make_toy_model(root / f"{model_type}-a", model_type, seed=1)
        models[model_type] = (base, make_toy_model(root / f"{model_type}-b", model_type, seed=2, base=base))
    return models


def logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 42, 99]])).logits


@pytest.mark.parametrize("model_type", ["gemma2", "phi3", "qwen2"])
def test_linear_merge_loads_and_runs(model_type, family_models, write_recipe, run_yaml, tmp_path):
    a, b = family_models[model_type]
    recipe = write_recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(a), "parameters": {"weight": 0.5}},
                {"model": str(b), "parameters": {"weight": 0.5}},
            ],
        }
    )
    assert run_yaml(recipe, tmp_path / "out", "--quiet").exit_code == 0
    merged, first, second = read_tensors(tmp_path / "out"), read_tensors(a), read_tensors(b)
    assert set(merged) == set(first)
    for name in merged:
        torch.testing.assert_close(merged[name], 0.5 * first[name] + 0.5 * second[name])
    assert torch.isfinite(logits(tmp_path / "out")).all()


def test_qwen3_frankenmerge_rewrites_per_layer_config(family_models, write_recipe, run_yaml, tmp_path):
    a, b = family_models["qwen3"]
    config_a = json.loads((a / "config.json").read_text())
    config_a["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config_a["use_sliding_window"] = True
    config_a["sliding_window"] = 8
    (a / "config.json").write_text(json.dumps(config_a))
    recipe = write_recipe(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
            ],
        }
    )
    assert run_yaml(recipe, tmp_path / "out", "--quiet").exit_code == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    layer_types_b = json.loads((b / "config.json").read_text())["layer_types"]
    # output layers come from a's layers 0, 1 and b's layers 1, 2, 3
    assert config["layer_types"] == config_a["layer_types"][:2] + layer_types_b[1:4]
    assert config["layer_types"][1] == "sliding_attention" and "sliding_attention" not in layer_types_b
    assert logits(tmp_path / "out").shape == (1, 4, config["vocab_size"])
