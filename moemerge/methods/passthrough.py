"""Passthrough: copy tensors from exactly one source, optionally scaled (the building block of frankenmerges)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemerge.errors import ConfigError
from moemerge.methods.registry import MergeMethod, NoParams, Params, register


class PassthroughModelParams(Params):
    scale: float | None = None  # multiply the copied tensor; None leaves it unchanged


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[PassthroughModelParams],
    method_params: Params,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x, or scale · x."""
    if len(tensors) != 1:
        raise ConfigError(f"passthrough copies from exactly one model per tensor, got {len(tensors)}")
    (tensor,) = tensors
    scale = model_params[0].scale
    return tensor if scale is None else tensor * scale


register(
    MergeMethod(
        name="passthrough",
        merge=merge,
        model_params=PassthroughModelParams,
        method_params=NoParams,
        single_source=True,
        elementwise=True,
    )
)
