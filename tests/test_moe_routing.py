"""Routing rules against the router modules transformers runs for each family (same inputs, same choices)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config, GptOssConfig, MixtralConfig, Qwen2MoeConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from moemerge.moe.routing import (
    ROUTER_KINDS,
    RoutingRule,
    route,
    router_logits,
    routing_rule,
    sigmoid_group,
    softmax_topk,
)

HIDDEN, EXPERTS, TOKENS = 16, 8, 64


def _sorted(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def _check(rule: RoutingRule, module: torch.nn.Module, bias: torch.Tensor | None = None) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    with torch.no_grad():
        module.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=generator))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(EXPERTS, generator=generator))
        if bias is not None:
            module.e_score_correction_bias.copy_(bias)
        _, expected_weights, expected_indices = module(hidden)
    logits = router_logits(hidden, module.weight, getattr(module, "bias", None))
    indices, weights = route(rule, logits, bias)
    expected_indices, expected_weights = _sorted(expected_indices, expected_weights)
    indices, weights = _sorted(indices, weights)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(weights, expected_weights.float())


def _rule(config, kind: str) -> RoutingRule:
    return routing_rule(config.to_dict(), kind)


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk_is_qwen2_moe_router(norm):
    config = Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=3, norm_topk_prob=norm)
    _check(_rule(config, "softmax_topk"), Qwen2MoeTopKRouter(config))


def test_softmax_topk_is_mixtral_router_which_always_renormalises():
    config = MixtralConfig(hidden_size=HIDDEN, num_local_experts=EXPERTS, num_experts_per_tok=2)
    rule = _rule(config, "softmax_topk")
    assert rule.normalize
    _check(rule, MixtralTopKRouter(config))


def test_topk_softmax_is_gpt_oss_router_with_its_bias():
    config = GptOssConfig(hidden_size=HIDDEN, num_local_experts=EXPERTS, num_experts_per_tok=2)
    _check(_rule(config, "topk_softmax"), GptOssTopKRouter(config))


@pytest.mark.parametrize(("groups", "top_groups", "norm"), [(1, 1, True), (4, 2, True), (2, 1, False)])
def test_sigmoid_group_is_deepseek_v3_router(groups, top_groups, norm):
    config = DeepseekV3Config(
        hidden_size=HIDDEN,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=2,
        n_group=groups,
        topk_group=top_groups,
        norm_topk_prob=norm,
        routed_scaling_factor=2.5,
    )
    bias = torch.linspace(-0.3, 0.3, EXPERTS)
    _check(_rule(config, "sigmoid_group"), DeepseekV3TopkRouter(config), bias)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_group_is_deepseek_v2_router(method):
    config = DeepseekV2Config(
        hidden_size=HIDDEN,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        topk_method=method,
        num_attention_heads=4,
        routed_scaling_factor=16.0,
    )
    _check(_rule(config, "softmax_group"), DeepseekV2TopkRouter(config))


def test_hand_computed_cases():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    indices, weights = softmax_topk(logits, 2, normalize=True)
    assert indices.tolist() == [[1, 2]]
    e = torch.tensor([2.0, 1.0]).exp()
    torch.testing.assert_close(weights, (e / e.sum()).unsqueeze(0))
    # The correction bias changes which expert is chosen, but not the weight it gets.
    indices, weights = sigmoid_group(logits, 1, correction_bias=torch.tensor([5.0, 0, 0, 0]), normalize=False)
    assert indices.tolist() == [[0]]
    torch.testing.assert_close(weights, torch.tensor([[0.5]]))
    # Groups {0,1} and {2,3} score the sum of their two best: the best single expert (1) loses to group {2,3}.
    indices, _ = sigmoid_group(torch.tensor([[0.0, 3.0, 2.9, 2.8]]), 2, groups=2, top_groups=1)
    assert sorted(indices[0].tolist()) == [2, 3]


def test_softmax_routers_pick_by_logits_in_the_model_dtype():
    """transformers' Mixtral/Qwen/OLMoE/GPT-OSS routers compute bfloat16 logits for a bfloat16 model, DeepSeek's
    float32 ones: the statistics must choose by the same numbers."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 32, generator=generator).bfloat16()
    weight, bias = torch.randn(8, 32, generator=generator).bfloat16(), torch.randn(8, generator=generator).bfloat16()
    in_model_dtype = router_logits(hidden, weight, bias, in_float32=False)
    assert in_model_dtype.dtype == torch.float32
    assert torch.equal(in_model_dtype, torch.nn.functional.linear(hidden, weight, bias).float())
    assert not torch.equal(in_model_dtype, router_logits(hidden, weight, bias))  # float32 math rounds differently
    kinds = {kind: RoutingRule(kind, 2).float32_logits for kind in ROUTER_KINDS}
    assert kinds == {"softmax_topk": False, "topk_softmax": False, "sigmoid_group": True, "softmax_group": True}
