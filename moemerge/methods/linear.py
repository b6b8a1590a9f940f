"""Linear merge (model soup): a weighted average of the inputs.

The sum is accumulated in float64 and returned as is, so that rounding it to the math dtype is the only rounding:
the result is the correctly rounded weighted average of the (math-dtype) inputs, in bfloat16 as in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemerge.errors import ConfigError
from moemerge.methods.registry import MergeMethod, Params, register

ACCUMULATE_CHUNK = 2**16  # entries summed at once on the CPU


class LinearModelParams(Params):
    weight: float


class LinearParams(Params):
    normalize: bool = True  # divide by Σ w_i, so weights need not sum to 1


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[LinearModelParams],
    method_params: LinearParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Σ_i w_i x_i, divided by Σ_i w_i when `normalize`; the float64 sum, which the caller rounds once."""
    weights = [params.weight for params in model_params]
    if method_params.normalize and sum(weights) == 0:
        raise ConfigError("weight: the weights sum to 0, so normalize cannot divide by them (set normalize: false)")
    total_weight = sum(weights) if method_params.normalize else None
    merged = torch.empty(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    flat_inputs = [tensor.reshape(-1) for tensor in tensors]  # the inputs stay untouched: one may be passed twice
    flat = merged.view(-1)
    # chunks that stay in cache: float64 accumulation then costs ~3× a float32 sum, not ~7×, and each input
    # (float32, or bfloat16 as stored) is widened a chunk at a time instead of into a full-size copy
    chunk = ACCUMULATE_CHUNK if merged.device.type == "cpu" else flat.numel()
    for start in range(0, flat.numel(), max(chunk, 1)):
        total = flat[start : start + chunk]
        total.copy_(flat_inputs[0][start : start + chunk]).mul_(weights[0])
        for tensor, weight in zip(flat_inputs[1:], weights[1:], strict=True):
            total.add_(tensor[start : start + chunk], alpha=weight)  # computed in float64
        if total_weight is not None:
            total /= total_weight
    return merged


register(
    MergeMethod(
        name="linear",
        merge=merge,
        model_params=LinearModelParams,
        method_params=LinearParams,
        elementwise=True,
        widens_inputs=True,
    )
)
