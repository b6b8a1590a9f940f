"""NearSwap: take the other model's value where it is close to the base's, keep the base's where it is far.

Per entry the other model's share is clamp(t / max(|base − x|, 1e-6), 0, 1): entries closer than `t` are
swapped in whole, farther ones move toward x by t / distance (mergekit 0.1.5's formula).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemerge.methods.registry import Params, base_and_other, register_against_base

DISTANCE_FLOOR = 1e-6


class NearswapParams(Params):
    t: float  # distance below which the other model's value replaces the base's


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: NearswapParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """w x + (1 − w) base, w = clamp(t / max(|base − x|, 1e-6), 0, 1) per entry."""
    base, other = base_and_other(tensors, base)
    # in one temporary, by the same roundings as t / d (which torch computes as d⁻¹ · t) and 1 − w (as −w + 1)
    share = torch.sub(base, other).abs_().clamp_(min=DISTANCE_FLOOR).reciprocal_().mul_(method_params.t)
    share.clamp_(0.0, 1.0)
    other.mul_(share)
    return other.add_(share.neg_().add_(1.0).mul_(base))


register_against_base("nearswap", merge, NearswapParams, elementwise=True)
