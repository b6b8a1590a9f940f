"""Spherical linear interpolation between the base model and one other model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moemerge.errors import ConfigError
from moemerge.methods.registry import MergeMethod, NoParams, Params, register

NEAR_PARALLEL = 0.9995  # |cos θ| above this: the arc is a straight line to float precision, interpolate linearly
NORM_EPSILON = 1e-8  # vectors shorter than this are not normalised (a zero vector stays zero)


class SlerpParams(Params):
    t: float  # 0 gives the base model, 1 the other model


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: SlerpParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """slerp(v0, v1; t) = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1, θ the angle between the flattened tensors.

    Falls back to (1−t)·v0 + t·v1 when the tensors are near parallel. Computed in (at least) float32.
    """
    assert base is not None
    if len(tensors) != 1:
        raise ConfigError(f"slerp interpolates between base_model and exactly one other model, got {len(tensors)}")
    t = method_params.t
    compute_dtype = torch.promote_types(base.dtype, torch.float32)
    v0 = base.reshape(-1).to(compute_dtype)
    v1 = tensors[0].reshape(-1).to(compute_dtype)
    cos_theta = float(torch.dot(v0, v1)) / (_norm_or_one(v0) * _norm_or_one(v1))

    if abs(cos_theta) > NEAR_PARALLEL:
        scale0, scale1 = 1.0 - t, t
    else:
        theta = math.acos(cos_theta)
        sin_theta = math.sin(theta)
        scale0, scale1 = math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta
    # built in v1's memory (the input is the method's own; a cast made a fresh copy anyway): no temporaries
    merged = v1.mul_(scale1).add_(v0, alpha=scale0)
    return merged.reshape(base.shape).to(base.dtype)


def _norm_or_one(vector: torch.Tensor) -> float:
    """‖v‖, or 1 when ‖v‖ ≤ ε: dividing the dot product by it equals normalising copies of v first."""
    norm = float(torch.linalg.vector_norm(vector))
    return norm if norm > NORM_EPSILON else 1.0


register(
    MergeMethod(
        name="slerp",
        merge=merge,
        model_params=NoParams,
        method_params=SlerpParams,
        uses_base=True,
        model_count=1,
    )
)
