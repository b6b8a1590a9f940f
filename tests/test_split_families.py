"""Pruning every MoE family the table knows (DeepSeek-V2/V3, GLM-4-MoE with shared experts, dense first layers and
score-correction bias; Mixtral, Qwen2/3-MoE, OLMoE): transformers loads and runs the smaller MoE."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_tensors
from family_models import build_family, load_family

from moemerge.errors import MoemergeError
from moemerge.executor import write_tensors
from moemerge.io.loader import LazyModel
from moemerge.split.dense import dense_model_type
from moemerge.split.experts import MoeSource
from moemerge.split.prune import plan_pruned, pruned_config

FIRST_DENSE = {"deepseek_v2", "deepseek_v3", "glm4_moe"}  # first_k_dense_replace: 1 in family_models


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2", "glm4_moe", "mixtral", "qwen2_moe", "olmoe"])
def test_family_prunes_to_a_loadable_moe(model_type, tmp_path):
    folder = build_family(tmp_path / "moe", model_type, seed=3)
    source = MoeSource(LazyModel.open(str(folder)))
    assert source.moe_layers == ([1] if model_type in FIRST_DENSE else [0, 1])
    assert source.num_experts == 4
    kept = {layer: [1, 3] for layer in source.moe_layers}
    out = tmp_path / "pruned"
    out.mkdir()
    write_tensors(out, plan_pruned(source, kept), max_shard_bytes=10**9, progress=False)
    (out / "config.json").write_text(json.dumps(pruned_config(source, 2)))
    model, info = load_family(out, model_type)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 17, 42, 99]])).logits).all()
    stored, original = read_tensors(out), read_tensors(folder)
    for layer in source.moe_layers:
        router = source.arch.layer_name(layer, source.moe.router)
        assert torch.equal(stored[router], original[router][[1, 3]])
        if source.moe.correction_bias:
            bias = source.arch.layer_name(layer, source.moe.correction_bias)
            assert torch.equal(stored[bias], original[bias][[1, 3]])
        if source.moe.shared_expert:  # shared experts are always on: kept as they are
            shared = source.arch.layer_name(layer, source.moe.shared_expert.down)
            assert torch.equal(stored[shared], original[shared])


def test_deepseek_has_no_dense_twin(tmp_path):
    source = MoeSource(LazyModel.open(str(build_family(tmp_path / "moe", "deepseek_v3", seed=3))))
    with pytest.raises(MoemergeError, match="no dense counterpart"):
        dense_model_type(source)
