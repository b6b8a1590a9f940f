"""Spherical linear interpolation between the base model and one other model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moemerge.errors import ConfigError
from moemerge.methods.registry import BlockSource, MergeMethod, NoParams, Params, TwoPass, register

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
    scale0, scale1 = _scales(cos_theta, t)
    # built in v1's memory (the input is the method's own; a cast made a fresh copy anyway): no temporaries
    merged = v1.mul_(scale1).add_(v0, alpha=scale0)
    return merged.reshape(base.shape).to(base.dtype)


def _scales(cos_theta: float, t: float) -> tuple[float, float]:
    """The weights of v0 and v1: sin((1−t)θ)/sin θ and sin(tθ)/sin θ, or 1−t and t when nearly parallel."""
    if abs(cos_theta) > NEAR_PARALLEL:
        return 1.0 - t, t
    theta = math.acos(cos_theta)
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta


def statistics(
    source: BlockSource,
    model_params: Sequence[Params],
    method_params: SlerpParams,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """The two weights from v0·v1, ‖v0‖² and ‖v1‖² summed over row blocks (float64 sums of float32 block dots)."""
    dot = norm0 = norm1 = 0.0
    for _, base, (other,) in source.blocks():
        v0, v1 = base.reshape(-1).float(), other.reshape(-1).float()
        dot += float(torch.dot(v0, v1))
        norm0 += float(torch.dot(v0, v0))
        norm1 += float(torch.dot(v1, v1))
    norms = [math.sqrt(n) if math.sqrt(n) > NORM_EPSILON else 1.0 for n in (norm0, norm1)]
    return _scales(dot / (norms[0] * norms[1]), method_params.t)


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[Params],
    method_params: SlerpParams,
    scales: tuple[float, float],
    first_entry: int,
) -> torch.Tensor:
    """One block of the interpolation, with the whole tensor's weights."""
    compute_dtype = torch.promote_types(base.dtype, torch.float32)
    merged = tensors[0].to(compute_dtype).mul_(scales[1]).add_(base.to(compute_dtype), alpha=scales[0])
    return merged.to(base.dtype)


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
        two_pass=TwoPass(statistics=statistics, merge_block=merge_block),
    )
)
