"""Planned MoE tensors have exactly the names and shapes transformers' save_pretrained writes for that config."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from moemerge.config.moe_recipe import parse_moe_recipe
from moemerge.errors import ConfigError, TensorError
from moemerge.io.loader import ModelPool
from moemerge.moe.config import moe_config
from moemerge.moe.plan import Origin, plan_moe
from moemerge.moe.sources import resolve_sources

pytest_plugins = ("moe_fixtures",)


def saved_layout(config: dict, folder) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a randomly initialised model of `config`, as save_pretrained writes them."""
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.save_pretrained(folder)
    layout: dict[str, tuple[int, ...]] = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            layout.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return layout


CASES = {
    "mixtral": ("mistral", ["coder", "math", "story"], None),
    "qwen2_moe": ("qwen2", ["qwen2_ft1", "qwen2_ft2"], "qwen2"),
    "qwen3_moe": ("qwen3", ["qwen3_ft1", "qwen3_ft2"], None),
}


@pytest.mark.parametrize("architecture", list(CASES))
def test_plan_matches_save_pretrained_layout(moe_models, tmp_path, architecture):
    base, experts, shared = CASES[architecture]
    recipe = parse_moe_recipe(
        {
            "base_model": str(moe_models[base]),
            "gate_mode": "random",
            "experts": [{"source_model": str(moe_models[name])} for name in experts],
            "shared_experts": [{"source_model": str(moe_models[shared])}] if shared else [],
        }
    )
    sources = resolve_sources(recipe, ModelPool())
    assert sources.target.name == architecture  # inferred from the base (and the shared expert)
    planned = plan_moe(sources)
    expected = saved_layout(moe_config(sources, recipe.experts_per_token), tmp_path)
    assert {t.name: t.shape for t in planned} == expected
    assert len(planned) == len(expected)  # no duplicates
    routers = [t for t in planned if t.origin is Origin.ROUTER]
    assert [t.layer for t in routers] == list(range(4))


def test_expert_tensors_come_from_their_models_and_residual_scale_hits_down_only(moe_models):
    recipe = parse_moe_recipe(
        {
            "base_model": str(moe_models["mistral"]),
            "gate_mode": "random",
            "experts": [
                {"source_model": str(moe_models["coder"])},
                {"source_model": str(moe_models["math"]), "residual_scale": 0.25},
            ],
        }
    )
    planned = {t.name: t for t in plan_moe(resolve_sources(recipe, ModelPool()))}
    down = planned["model.layers.2.block_sparse_moe.experts.1.w2.weight"]
    assert down.model.folder == moe_models["math"]
    assert down.source_name == "model.layers.2.mlp.down_proj.weight" and down.scale == 0.25
    gate = planned["model.layers.2.block_sparse_moe.experts.1.w1.weight"]
    assert gate.source_name == "model.layers.2.mlp.gate_proj.weight" and gate.scale == 1.0
    up = planned["model.layers.0.block_sparse_moe.experts.0.w3.weight"]
    assert up.model.folder == moe_models["coder"] and up.source_name == "model.layers.0.mlp.up_proj.weight"
    attention = planned["model.layers.3.self_attn.q_proj.weight"]
    assert attention.model.folder == moe_models["mistral"]
    assert not any(".mlp." in name for name in planned)


def test_expert_tensor_with_wrong_shape_is_named(moe_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(moe_models["coder"], broken)
    state = load_file(broken / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = parse_moe_recipe(
        {"base_model": str(moe_models["mistral"]), "gate_mode": "random", "experts_per_token": 1,
         "experts": [{"source_model": str(broken)}]}
    )  # fmt: skip
    with pytest.raises(TensorError, match="'model.layers.1.mlp.up_proj.weight' has shape \\[100, 64\\]"):
        plan_moe(resolve_sources(recipe, ModelPool()))


def test_a_qwen3_base_cannot_become_mixtral(moe_models):
    recipe = parse_moe_recipe(
        {"base_model": str(moe_models["qwen3"]), "architecture": "mixtral", "gate_mode": "random",
         "experts_per_token": 1, "experts": [{"source_model": str(moe_models["qwen3_ft1"])}]}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="q_norm/k_norm"):
        resolve_sources(recipe, ModelPool())
