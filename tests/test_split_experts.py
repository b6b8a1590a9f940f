"""MoeSource reads the same expert weights from the per-expert on-disk layout and the fused v5 layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from split_fixtures import W, read_tensors

from moemerge.errors import MoemergeError
from moemerge.io.loader import LazyModel
from moemerge.split.experts import MoeSource


def test_per_expert_layout_reads_the_stored_tensors(split_models):
    source = MoeSource(LazyModel(split_models["mixtral"]))
    stored = read_tensors(split_models["mixtral"])
    assert (source.num_experts, source.experts_per_token, source.intermediate_size) == (4, 2, 128)
    assert not source.fused
    for layer in range(4):
        for expert in range(4):
            for part, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                expected = stored[W.format(layer=layer, expert=expert, w=w)]
                assert torch.equal(source.expert_part(layer, expert, part), expected)


def test_fused_layout_reads_the_same_experts(split_models):
    per_expert = MoeSource(LazyModel(split_models["mixtral"]))
    fused = MoeSource(LazyModel(split_models["mixtral_fused"]))
    assert sorted(fused.fused) == [0, 1, 2, 3]
    assert fused.router_name(0) == "model.layers.0.mlp.gate.weight"  # v5 renames block_sparse_moe to mlp
    for layer in range(4):
        assert torch.equal(fused.router(layer), per_expert.router(layer))
        for expert in range(4):
            for part in ("gate", "up", "down"):
                assert torch.equal(fused.expert_part(layer, expert, part), per_expert.expert_part(layer, expert, part))
                assert fused.part_shape(layer, part) == per_expert.part_shape(layer, part)


def test_fused_gate_rows_come_first(split_models):
    """Independent of moemerge: transformers' own fused tensor chunks into (gate, up) = (w1, w3)."""
    fused = read_tensors(split_models["mixtral_fused"])["model.layers.2.mlp.experts.gate_up_proj"]
    stored = read_tensors(split_models["mixtral"])
    gate, up = fused[1].chunk(2, dim=0)
    assert torch.equal(gate, stored[W.format(layer=2, expert=1, w="w1")])
    assert torch.equal(up, stored[W.format(layer=2, expert=1, w="w3")])


def test_shared_expert_and_expert_tensor_roles(split_models):
    source = MoeSource(LazyModel(split_models["qwen2_moe"]))
    assert source.has_shared_expert and source.intermediate_size == 32
    assert source.is_expert_tensor("model.layers.1.mlp.shared_expert_gate.weight")
    assert source.is_expert_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
    assert not source.is_expert_tensor("model.layers.1.self_attn.q_proj.bias")


def test_dense_model_is_refused(split_models):
    with pytest.raises(MoemergeError, match="dense 'llama' model, not a mixture of experts"):
        MoeSource(LazyModel(split_models["llama"]))


def test_unsupported_architecture_is_named(split_models, tmp_path):
    folder = shutil.copytree(split_models["mixtral"], tmp_path / "dbrx")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "dbrx"}))
    with pytest.raises(MoemergeError, match="'dbrx' is not supported for expert extraction"):
        MoeSource(LazyModel(folder))


def test_expert_out_of_range(split_models):
    source = MoeSource(LazyModel(split_models["mixtral"]))
    with pytest.raises(MoemergeError, match="expert 4 is out of range: the model has experts 0..3"):
        source.expert_part(0, 4, "gate")
