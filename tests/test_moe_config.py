"""The MoE config.json built from a dense base config, read back by transformers' own config classes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from moemerge.architectures import find_architecture
from moemerge.moe.config import moe_config
from moemerge.toys import toy_config


def sources_for(base_type: str, target: str, experts: int = 3, shared_intermediate: int | None = None, **overrides):
    base_config = toy_config(base_type, **overrides).to_dict()
    return SimpleNamespace(
        base=SimpleNamespace(config=base_config),
        target=find_architecture(target),
        experts=[object()] * experts,
        expert_intermediate=base_config["intermediate_size"],
        shared_intermediate=shared_intermediate,
    )


def load(config: dict):
    return AutoConfig.for_model(**config)


def test_mixtral_from_mistral_keeps_attention_and_rope():
    sources = sources_for("mistral", "mixtral", sliding_window=32, rope_theta=5e5)
    config = moe_config(sources, experts_per_token=2)
    assert config["architectures"] == ["MixtralForCausalLM"]
    loaded = load(config)
    assert loaded.model_type == "mixtral"
    assert (loaded.num_local_experts, loaded.num_experts_per_tok, loaded.intermediate_size) == (3, 2, 128)
    assert loaded.sliding_window == 32
    assert loaded.rope_parameters["rope_theta"] == pytest.approx(5e5)
    assert (loaded.num_attention_heads, loaded.num_key_value_heads, loaded.hidden_size) == (4, 2, 64)


def test_mixtral_from_llama_drops_llama_only_keys():
    config = moe_config(sources_for("llama", "mixtral"), experts_per_token=1)
    assert "pretraining_tp" not in config and "mlp_bias" not in config and "attention_bias" not in config
    assert config["sliding_window"] is None
    assert load(config).num_experts_per_tok == 1


def test_qwen3_moe_renormalises_and_makes_every_layer_sparse():
    config = moe_config(sources_for("qwen3", "qwen3_moe", experts=4), experts_per_token=2)
    loaded = load(config)
    assert loaded.model_type == "qwen3_moe"
    assert loaded.num_experts == 4  # written as mergekit/Qwen checkpoints do; transformers maps it
    assert loaded.moe_intermediate_size == 128
    assert loaded.norm_topk_prob is True
    assert loaded.decoder_sparse_step == 1 and loaded.mlp_only_layers == []
    assert loaded.head_dim == 16


def test_qwen2_moe_has_shared_expert_size_and_biases():
    config = moe_config(sources_for("qwen2", "qwen2_moe", experts=2, shared_intermediate=96), experts_per_token=1)
    loaded = load(config)
    assert (loaded.num_experts, loaded.moe_intermediate_size, loaded.shared_expert_intermediate_size) == (2, 128, 96)
    # Qwen2-MoE checkpoints do not renormalise (and llama.cpp never does): that is the default, with an option
    assert loaded.qkv_bias is True and loaded.norm_topk_prob is False
    assert loaded.mlp_only_layers == [] and loaded.decoder_sparse_step == 1
    sources = sources_for("qwen2", "qwen2_moe", experts=2, shared_intermediate=96)
    assert load(moe_config(sources, experts_per_token=1, norm_topk_prob=True)).norm_topk_prob is True


@pytest.mark.parametrize(("base", "target"), [("mistral", "mixtral"), ("qwen3", "qwen3_moe"), ("qwen2", "qwen2_moe")])
def test_legacy_rope_keys_beside_rope_parameters_give_the_same_rope(base, target):
    """transformers 4.x reads only rope_theta/rope_scaling: a config with only those must mean the same rope."""
    shared = 96 if target == "qwen2_moe" else None
    config = moe_config(sources_for(base, target, experts=2, shared_intermediate=shared, rope_theta=12345.0), 1)
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == pytest.approx(12345.0)
    legacy_only = {key: value for key, value in config.items() if key != "rope_parameters"}
    assert load(legacy_only).rope_parameters["rope_theta"] == pytest.approx(12345.0)
    assert load(config).rope_parameters == load(legacy_only).rope_parameters


def test_glm4_moe_from_llama3_rope_keeps_llamas_rotary_frequencies():
    """The DeepSeek-style output rotates the whole head with the base's rope (here Llama 3's scaled rope)."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    sources = sources_for("llama", "glm4_moe", experts=2, shared_intermediate=256, rope_parameters=rope)
    config = moe_config(sources, experts_per_token=1)
    assert (config["architectures"], config["n_shared_experts"]) == (["Glm4MoeForCausalLM"], 2)
    glm = Glm4MoeRotaryEmbedding(load(config))
    llama = LlamaRotaryEmbedding(toy_config("llama", rope_parameters=rope))
    assert glm.inv_freq.shape == llama.inv_freq.shape
    assert torch.equal(glm.inv_freq, llama.inv_freq) and glm.attention_scaling == llama.attention_scaling
