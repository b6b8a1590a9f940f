"""A LayerMix's dense MLP against the expert outputs computed directly from the stored tensors."""

from __future__ import annotations

import torch
from split_fixtures import W, read_tensors

from moemerge.io.loader import LazyModel
from moemerge.split.dense import LayerMix, mixed_part
from moemerge.split.experts import MoeSource


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def expert_output(stored: dict, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    weight = {w: stored[W.format(layer=layer, expert=expert, w=w)].double() for w in ("w1", "w2", "w3")}
    return swiglu(x, weight["w1"], weight["w3"], weight["w2"])


def mixed_output(source: MoeSource, layer: int, mix: LayerMix, x: torch.Tensor) -> torch.Tensor:
    parts = {part: mixed_part(source, layer, mix, part).double() for part in ("gate", "up", "down")}
    return swiglu(x, parts["gate"], parts["up"], parts["down"])


def test_concat_is_the_fixed_mixture_of_expert_outputs(split_models):
    source, stored = MoeSource(LazyModel(split_models["mixtral"])), read_tensors(split_models["mixtral"])
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mix = LayerMix((2, 0), (0.7, 0.3))
    expected = 0.7 * expert_output(stored, 1, 2, x) + 0.3 * expert_output(stored, 1, 0, x)
    torch.testing.assert_close(mixed_output(source, 1, mix, x), expected, rtol=1e-5, atol=1e-6)


def test_concat_of_all_experts_with_uniform_weights_is_the_mean_output(split_models):
    source, stored = MoeSource(LazyModel(split_models["mixtral"])), read_tensors(split_models["mixtral"])
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mix = LayerMix((0, 1, 2, 3), (0.25,) * 4)
    expected = torch.stack([expert_output(stored, 3, e, x) for e in range(4)]).mean(dim=0)
    torch.testing.assert_close(mixed_output(source, 3, mix, x), expected, rtol=1e-5, atol=1e-6)


def test_average_averages_weights_not_outputs(split_models):
    source, stored = MoeSource(LazyModel(split_models["mixtral"])), read_tensors(split_models["mixtral"])
    mix = LayerMix((0, 1, 2, 3), (), average=True)
    gate = mixed_part(source, 0, mix, "gate")
    expected = torch.stack([stored[W.format(layer=0, expert=e, w="w1")] for e in range(4)]).mean(dim=0)
    torch.testing.assert_close(gate, expected, rtol=1e-6, atol=1e-7)
    assert gate.shape == (128, 64)


def test_shared_expert_joins_with_its_stand_in_gate(split_models):
    source, stored = MoeSource(LazyModel(split_models["qwen2_moe"])), read_tensors(split_models["qwen2_moe"])
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mix = LayerMix((3,), (1.0,), shared_scale=0.4)

    def mlp(prefix: str) -> torch.Tensor:
        w = {
            p: stored[f"model.layers.0.mlp.{prefix}.{p}.weight"].double() for p in ("gate_proj", "up_proj", "down_proj")
        }
        return swiglu(x, w["gate_proj"], w["up_proj"], w["down_proj"])

    expected = mlp("experts.3") + 0.4 * mlp("shared_expert")
    torch.testing.assert_close(mixed_output(source, 0, mix, x), expected, rtol=1e-5, atol=1e-6)
