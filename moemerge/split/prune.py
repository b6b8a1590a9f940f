"""Write a smaller MoE: keep K experts per layer, renumber them 0..K-1 and slice the router rows to match.

The kept experts' weights are copied bit for bit and the router keeps their rows in the same order,
so a token whose top-k experts all survive is routed to the same experts; with renormalised top-k
weights (Mixtral, or `norm_topk_prob: true`) it gets the same weights and the same output. Without
renormalisation (Qwen2-MoE/Qwen3-MoE/OLMoE default) the softmax runs over fewer experts, so the
surviving weights grow a little even for such tokens.
"""

from __future__ import annotations

import logging

import torch

from moemerge.architectures import Role, with_legacy_rope_keys
from moemerge.errors import MoemergeError
from moemerge.executor import OutputTensor
from moemerge.io.writer import TensorSpec
from moemerge.split.dense import in_layer_order
from moemerge.split.experts import EXPERT_COUNT_KEYS, MoeSource

log = logging.getLogger(__name__)
SHARED_ROLES = (Role.SHARED_EXPERT, Role.SHARED_EXPERT_GATE)  # always on, kept as they are


def check_prune_count(source: MoeSource, count: int) -> None:
    if not 1 <= count < source.num_experts:
        raise MoemergeError(
            f"--prune-to {count}: K must be at least 1 and less than the model's {source.num_experts} experts"
        )


def plan_pruned(source: MoeSource, kept: dict[int, list[int]]) -> list[OutputTensor]:
    """Every output tensor of the pruned MoE, in the on-disk per-expert layout whatever the input layout (fused
    where the family has no other)."""
    model = source.model
    outputs = [
        OutputTensor(
            TensorSpec(name, model.shape(name), model.dtype(name)),
            lambda name=name: model.read(name),
            copy_of=(model, name),
        )
        for name in model.names
        if not source.is_expert_tensor(name) or source.arch.role_of(name) in SHARED_ROLES
    ]
    for layer in source.moe_layers:
        experts = kept[layer]
        router = source.router_name(layer)
        router_name = source.arch.layer_name(layer, source.moe.router)
        hidden = model.shape(router)[1]
        outputs.append(
            OutputTensor(
                TensorSpec(router_name, (len(experts), hidden), model.dtype(router)),
                lambda router=router, experts=experts: model.read(router)[experts].contiguous(),
            )
        )
        for suffix in (source.moe.router_bias, source.moe.correction_bias):
            # per-expert router vectors (GPT-OSS's logit bias, DeepSeek-V3's score-correction bias) keep the same rows
            name = source.arch.layer_name(layer, suffix) if suffix else None
            if name is not None and model.has(name):
                outputs.append(
                    OutputTensor(
                        TensorSpec(name, (len(experts),), model.dtype(name)),
                        lambda name=name, experts=experts: model.read(name)[experts].contiguous(),
                    )
                )
        if source.fused_only:
            outputs += _kept_fused(source, layer, experts)
            continue
        for new_index, old_index in enumerate(experts):
            for part in ("gate", "up", "down"):
                spec = TensorSpec(
                    source.expert_name(layer, new_index, part),
                    source.part_shape(layer, part),
                    source.part_dtype(layer),
                )
                outputs.append(
                    OutputTensor(
                        spec,
                        lambda layer=layer, old=old_index, part=part: source.expert_part(layer, old, part),
                        copy_of=source.stored_expert_part(layer, old_index, part),
                    )
                )
    return in_layer_order(outputs)


def _kept_fused(source: MoeSource, layer: int, experts: list[int]) -> list[OutputTensor]:
    """A fused-only family (GPT-OSS): each per-expert tensor (weights and biases) with the kept experts' slices
    stacked in their new order, read one expert at a time."""
    fused = source.fused[layer]
    model = source.model

    def kept(name: str) -> torch.Tensor:
        return torch.stack([model.read_slice(name, expert) for expert in experts])

    return [
        OutputTensor(
            TensorSpec(name, (len(experts), *model.shape(name)[1:]), model.dtype(name)),
            lambda name=name: kept(name),
        )
        for name in fused.names()
    ]


def pruned_config(source: MoeSource, count: int) -> dict:
    """The MoE's config.json with K experts and at most K experts per token (legacy rope keys written beside
    rope_parameters)."""
    config = dict(source.config)
    keys = [key for key in EXPERT_COUNT_KEYS if key in config] or [source.moe.expert_count_key]
    for key in keys:
        config[key] = count
    config[source.moe.experts_per_token_key] = min(source.experts_per_token, count)
    if int(config.get("n_group") or 1) > 1:
        # Kept experts need not fill the groups evenly, so group-limited routing (DeepSeek, GLM-4-MoE) cannot carry
        # over: the pruned router picks its top-k among all kept experts.
        log.warning("n_group %s: the pruned router chooses among all kept experts (n_group 1)", config["n_group"])
        config["n_group"], config["topk_group"] = 1, 1
    return with_legacy_rope_keys(config)  # transformers 4.x reads only rope_theta / rope_scaling
