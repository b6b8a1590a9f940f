"""Linear merge (model soup): a weighted average of the inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemerge.errors import ConfigError
from moemerge.methods.registry import MergeMethod, Params, register


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
    """Σ_i w_i x_i, divided by Σ_i w_i when `normalize`."""
    weights = [params.weight for params in model_params]
    merged = torch.mul(tensors[0], weights[0])  # the inputs stay untouched: a caller may pass one tensor twice
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        merged.add_(tensor, alpha=weight)
    if method_params.normalize:
        total = sum(weights)
        if total == 0:
            raise ConfigError("weight: the weights sum to 0, so normalize cannot divide by them (set normalize: false)")
        merged /= total
    return merged


register(
    MergeMethod(
        name="linear",
        merge=merge,
        model_params=LinearModelParams,
        method_params=LinearParams,
        elementwise=True,
    )
)
