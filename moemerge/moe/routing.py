"""Routing rules: router logits → (expert indices, routing weights) per token, one pure function per family.

Every MoE family picks its experts differently, so statistics taken from the router (how often an
expert is picked, with what weight) must follow the family's own rule, not always softmax top-k:

- `softmax_topk`   Mixtral, Qwen2/3-MoE, OLMoE: p = softmax(logits); top-k of p; renormalised when
                   `norm_topk_prob` (Mixtral always).
- `topk_softmax`   GPT-OSS: top-k of the logits (the router has a bias), softmax over those k.
- `sigmoid_group`  DeepSeek-V3, GLM-4-MoE: s = sigmoid(logits); choose with s + e_score_correction_bias,
                   only inside the `topk_group` best of `n_group` groups (a group scores the sum of its
                   two best biased scores); weights are the unbiased s, renormalised when
                   `norm_topk_prob`, times `routed_scaling_factor`.
- `softmax_group`  DeepSeek-V2: p = softmax(logits); top-k ("greedy"), or top-k inside the `topk_group`
                   groups whose best p is highest ("group_limited_greedy"); times `routed_scaling_factor`.

Callers: split's calibration pass and the layer-by-layer runner. Nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

RouterKind = Literal["softmax_topk", "topk_softmax", "sigmoid_group", "softmax_group"]
ROUTER_KINDS: tuple[str, ...] = ("softmax_topk", "topk_softmax", "sigmoid_group", "softmax_group")


@dataclass(frozen=True)
class RoutingRule:
    """One family's routing rule with the config values it needs (plain data: crosses process boundaries)."""

    kind: RouterKind
    top_k: int
    normalize: bool = False  # renormalise the k weights to sum to 1
    scaling: float = 1.0  # routed_scaling_factor
    groups: int = 1  # n_group
    top_groups: int = 1  # topk_group

    @property
    def float32_logits(self) -> bool:
        """DeepSeek-style (group) routers compute their logits in float32, the others in the model's dtype."""
        return self.kind in ("sigmoid_group", "softmax_group")


def router_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, in_float32: bool = True
) -> torch.Tensor:
    """[tokens, experts] logits as float32 (`hidden @ weight.T + bias`), computed in float32, or in the model's
    dtype when `in_float32` is False (as transformers' softmax routers do: a bfloat16 model picks by bfloat16
    logits)."""
    if not in_float32:
        bias = None if bias is None else bias.to(hidden.dtype)
        return torch.nn.functional.linear(hidden, weight.to(hidden.dtype), bias).float()
    return torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


def softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of softmax(logits); weights renormalised over the k when `normalize`."""
    probs = logits.float().softmax(dim=-1)
    weights, indices = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return indices, weights


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the logits, softmax over those k values."""
    values, indices = logits.float().topk(top_k, dim=-1)
    return indices, values.softmax(dim=-1)


def _group_mask(group_scores: torch.Tensor, top_groups: int, experts: int) -> torch.Tensor:
    """[tokens, experts] True for experts inside each token's `top_groups` best groups."""
    tokens, groups = group_scores.shape
    chosen = group_scores.topk(top_groups, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    return mask.unsqueeze(-1).expand(tokens, groups, experts // groups).reshape(tokens, experts)


def sigmoid_group(
    logits: torch.Tensor,
    top_k: int,
    *,
    correction_bias: torch.Tensor | None = None,
    groups: int = 1,
    top_groups: int = 1,
    normalize: bool = True,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: choose by sigmoid + bias within the best groups, weigh by the unbiased sigmoid."""
    scores = logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    experts = scores.shape[-1]
    if groups > 1:
        per_group = choice.view(-1, groups, experts // groups)
        group_scores = per_group.topk(min(2, experts // groups), dim=-1).values.sum(dim=-1)
        choice = choice.masked_fill(~_group_mask(group_scores, top_groups, experts), float("-inf"))
    indices = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return indices, weights * scaling


def softmax_group(
    logits: torch.Tensor,
    top_k: int,
    *,
    groups: int = 1,
    top_groups: int = 1,
    normalize: bool = False,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: top-k of softmax(logits), within the groups whose best probability is highest."""
    probs = logits.float().softmax(dim=-1)
    experts = probs.shape[-1]
    if groups > 1:
        group_scores = probs.view(-1, groups, experts // groups).amax(dim=-1)
        probs = probs.masked_fill(~_group_mask(group_scores, top_groups, experts), 0.0)
    weights, indices = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return indices, weights * scaling


def route(
    rule: RoutingRule, logits: torch.Tensor, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [tokens, k], weights [tokens, k] float32) of the experts each token is sent to under `rule`."""
    if rule.kind == "softmax_topk":
        return softmax_topk(logits, rule.top_k, rule.normalize)
    if rule.kind == "topk_softmax":
        return topk_softmax(logits, rule.top_k)
    if rule.kind == "sigmoid_group":
        return sigmoid_group(
            logits,
            rule.top_k,
            correction_bias=correction_bias,
            groups=rule.groups,
            top_groups=rule.top_groups,
            normalize=rule.normalize,
            scaling=rule.scaling,
        )
    if rule.kind == "softmax_group":
        return softmax_group(
            logits,
            rule.top_k,
            groups=rule.groups,
            top_groups=rule.top_groups,
            normalize=rule.normalize,
            scaling=rule.scaling,
        )
    raise ValueError(f"unknown router kind {rule.kind!r}")


def _text(config: dict) -> dict:
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) and "num_hidden_layers" not in config else config


def routing_rule(config: dict, kind: RouterKind, *, experts_per_token_key: str = "num_experts_per_tok") -> RoutingRule:
    """The rule a checkpoint's config.json implies for a router of `kind` (defaults as transformers has them)."""
    config = _text(config)
    top_k = int(config.get(experts_per_token_key) or 1)
    if kind == "softmax_topk":
        # Mixtral has no norm_topk_prob key and always renormalises.
        return RoutingRule(kind, top_k, normalize=bool(config.get("norm_topk_prob", True)))
    if kind == "topk_softmax":
        return RoutingRule(kind, top_k, normalize=True)
    groups = int(config.get("n_group") or 1)
    top_groups = int(config.get("topk_group") or groups)
    scaling = float(config.get("routed_scaling_factor") or 1.0)
    if kind == "softmax_group":
        greedy = config.get("topk_method", "greedy") == "greedy"
        return RoutingRule(
            kind,
            top_k,
            normalize=bool(config.get("norm_topk_prob", False)),
            scaling=scaling,
            groups=1 if greedy else groups,
            top_groups=1 if greedy else top_groups,
        )
    return RoutingRule(
        kind,
        top_k,
        normalize=bool(config.get("norm_topk_prob", True)),
        scaling=scaling,
        groups=groups,
        top_groups=top_groups,
    )
