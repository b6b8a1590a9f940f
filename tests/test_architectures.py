"""The architecture table: roles of tensor names, layer renumbering, and the unknown-architecture fallback."""

from __future__ import annotations

import logging

import pytest

from moemerge.architectures import (
    Role,
    architecture_for_config,
    find_architecture,
    layer_count,
    layer_of,
    require_architecture,
    with_layer,
)
from moemerge.errors import MoemergeError


@pytest.mark.parametrize(
    ("model_type", "name", "role"),
    [
        ("llama", "model.embed_tokens.weight", Role.EMBEDDING),
        ("llama", "lm_head.weight", Role.LM_HEAD),
        ("qwen3", "model.norm.weight", Role.FINAL_NORM),
        ("qwen3", "model.layers.7.self_attn.q_norm.weight", Role.ATTENTION),
        ("mistral", "model.layers.0.mlp.down_proj.weight", Role.MLP),
        ("gemma2", "model.layers.3.pre_feedforward_layernorm.weight", Role.NORM),
        ("mixtral", "model.layers.2.block_sparse_moe.gate.weight", Role.ROUTER),
        ("mixtral", "model.layers.2.block_sparse_moe.experts.7.w2.weight", Role.EXPERT),
        ("qwen2_moe", "model.layers.1.mlp.experts.59.up_proj.weight", Role.EXPERT),
        ("qwen2_moe", "model.layers.1.mlp.shared_expert.down_proj.weight", Role.SHARED_EXPERT),
        ("qwen2_moe", "model.layers.1.mlp.shared_expert_gate.weight", Role.SHARED_EXPERT_GATE),
        ("qwen3_moe", "model.layers.1.mlp.gate.weight", Role.ROUTER),
        ("olmoe", "model.layers.0.mlp.experts.3.gate_proj.weight", Role.EXPERT),
    ],
)
def test_roles(model_type, name, role):
    assert find_architecture(model_type).role_of(name) == role


def test_layer_renumbering():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("model.norm.weight") is None
    assert with_layer("model.layers.12.mlp.up_proj.weight", 3) == "model.layers.3.mlp.up_proj.weight"
    assert with_layer("model.language_model.layers.1.x", 20) == "model.language_model.layers.20.x"


def test_moe_layout_templates_name_experts():
    moe = find_architecture("mixtral").moe
    assert moe.expert_gate.format(expert=3) == "block_sparse_moe.experts.3.w1.weight"
    assert moe.expert_count_key == "num_local_experts" and moe.dense_model_type == "mistral"
    assert find_architecture("qwen2_moe").moe.shared_expert is not None
    assert find_architecture("qwen3_moe").moe.shared_expert is None


def test_unknown_architecture_warns_and_falls_back(caplog):
    with caplog.at_level(logging.WARNING):
        arch = architecture_for_config({"model_type": "falcon-x"}, model_label="m")
    assert arch.name == "unknown" and "falcon-x" in caplog.text
    with pytest.raises(MoemergeError, match="'falcon-x' is not supported for MoE assembly"):
        require_architecture({"model_type": "falcon-x"}, model_label="m", need="MoE assembly")


def test_layer_count_reads_the_configured_key():
    assert layer_count({"num_hidden_layers": 5}, find_architecture("llama")) == 5
    with pytest.raises(MoemergeError, match="num_hidden_layers"):
        layer_count({}, find_architecture("llama"))


@pytest.mark.parametrize(
    ("architecture", "shared", "base_type", "expected"),
    [
        (None, False, "llama", "mixtral"),
        (None, False, "mistral", "mixtral"),
        (None, False, "qwen3", "qwen3_moe"),
        (None, False, "qwen2", "qwen2_moe"),  # no shared-expert-free output fits a Qwen2 base
        (None, True, "qwen2", "qwen2_moe"),
        (None, True, "llama", "glm4_moe"),  # mergekit-moe's DeepSeek output, written as GLM-4-MoE
        (None, True, "qwen3", "glm4_moe"),
        ("deepseek", True, "mistral", "glm4_moe"),
        ("qwen", False, "qwen3", "qwen3_moe"),
        ("qwen", True, "qwen2", "qwen2_moe"),
        ("qwen", False, "llama", "qwen2_moe"),
        ("mixtral", False, "qwen3", "mixtral"),  # refused later with the table's reason (q_norm/k_norm)
    ],
)
def test_moe_output_family_is_read_from_the_table(architecture, shared, base_type, expected):
    """mergekit-moe's choice of output family, from the table's dense_bases / recipe_names / shared experts."""
    from moemerge.config.moe_recipe import parse_moe_recipe
    from moemerge.moe.sources import infer_architecture

    recipe = {"base_model": "base", "gate_mode": "random", "experts_per_token": 1, "experts": [{"source_model": "a"}]}
    if architecture:
        recipe["architecture"] = architecture
    if shared:
        recipe["shared_experts"] = [{"source_model": "s"}]
    assert infer_architecture(parse_moe_recipe(recipe), base_type).name == expected


def test_fused_router_names_are_table_data():
    """A checkpoint saved from transformers' in-memory state keeps its router beside the fused experts."""
    mixtral, gpt_oss = find_architecture("mixtral"), find_architecture("gpt_oss")
    assert mixtral.role_of("model.layers.0.mlp.gate.weight") is Role.ROUTER
    assert mixtral.role_of("model.layers.0.mlp.experts.gate_up_proj") is Role.EXPERT
    assert gpt_oss.role_of("model.layers.0.mlp.router.bias") is Role.ROUTER
    assert gpt_oss.role_of("model.layers.0.mlp.experts.down_proj_bias") is Role.EXPERT


def test_model_kinds_agree_across_class_aliases_and_configs_without_a_class():
    from moemerge.architectures import mixed_kinds, model_kind

    llama = model_kind({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    alias = model_kind({"architectures": ["LLaMaForCausalLM"], "model_type": "llama"})
    bare = model_kind({"model_type": "llama"})  # no `architectures` in config.json
    assert mixed_kinds({"a": llama, "b": alias, "c": bare}) is None
    edited = model_kind({"architectures": ["LlamaForCausalLM"], "model_type": "mistral"})
    assert mixed_kinds({"a": llama, "b": edited}) == (
        "LlamaForCausalLM (llama) in 'a' and LlamaForCausalLM (mistral) in 'b'"
    )
    mistral = model_kind({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    assert mixed_kinds({"a": llama, "b": llama, "c": mistral}) == (
        "LlamaForCausalLM (llama) in 'a', 'b' and MistralForCausalLM (mistral) in 'c'"
    )
