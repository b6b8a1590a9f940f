"""NuSLERP: spherical interpolation between two models, or between their task vectors when a base is given.

t = w₁ / (w₀ + w₁) from the two models' `weight` (0.5 when the weights sum to zero; a method-level `t` is
accepted when no model sets a weight). The vectors interpolated are the whole flattened tensors
(`nuslerp_flatten`, the default), each row (the last dimension), or with `nuslerp_row_wise` each column
(vectors along dim 0). Unlike `slerp` the interpolated vectors keep their lengths: the result is
sin((1−t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁, and (1−t) v₀ + t v₁ where 1 − cos²θ ≤ 1e-16 (mergekit 0.1.5's
rule). With a base: base + nuslerp(x₀ − base, x₁ − base).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemerge.errors import ConfigError
from moemerge.methods.inner_products import combine, gram
from moemerge.methods.registry import BlockSource, MergeMethod, Params, TwoPass, register

NORM_FLOOR = 1e-7  # vectors are normalised by max(‖v‖, 1e-7)
COLINEAR = 1e-16  # 1 − cos²θ at or below this: interpolate linearly


class NuslerpModelParams(Params):
    weight: float | None = None


class NuslerpParams(Params):
    t: float | None = None  # used only when the models set no weight
    nuslerp_flatten: bool = True  # one angle for the whole tensor
    nuslerp_row_wise: bool = False  # without flatten: vectors along dim 0 (columns) instead of rows


def interpolation_t(model_params: Sequence[NuslerpModelParams], method_params: NuslerpParams) -> float:
    weights = [params.weight for params in model_params]
    if None in weights:
        if method_params.t is None or any(weight is not None for weight in weights):
            raise ConfigError("nuslerp: give each of the two models a 'weight' (or, for both, a method-level 't')")
        return method_params.t
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def scales(cos_theta: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of v₀ and v₁ for each vector's cos θ (float64)."""
    colinear = (1 - cos_theta.square()) <= COLINEAR
    theta = torch.acos(torch.where(colinear, 0.0, cos_theta))
    sin_theta = torch.where(colinear, 1.0, torch.sin(theta))
    scale0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    scale1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return scale0, scale1


def _cosine(dot: torch.Tensor, norm0: torch.Tensor, norm1: torch.Tensor) -> torch.Tensor:
    return (dot / (norm0.clamp(min=NORM_FLOOR) * norm1.clamp(min=NORM_FLOOR))).clamp(-1.0, 1.0)


def _reduced_dim(method_params: NuslerpParams) -> int | None:
    """The dimension the vectors run along: None for the flattened tensor, 0 for columns, -1 for rows."""
    if method_params.nuslerp_flatten:
        return None
    return 0 if method_params.nuslerp_row_wise else -1


def _products(v0: torch.Tensor, v1: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """v₀·v₁, ‖v₀‖², ‖v₁‖² along `dim` (kept), accumulated in float64."""
    pairs = ((v0, v1), (v0, v0), (v1, v1))
    return tuple(torch.sum(a * b, dim=dim, keepdim=True, dtype=torch.float64) for a, b in pairs)


def _vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    """x_i [− base] in at least float32, in the inputs' own memory (they are this call's; see MergeFunction)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    vectors = [tensor.to(dtype) for tensor in tensors]
    return vectors if base is None else [vector.sub_(base) for vector in vectors]


def _interpolate(v0: torch.Tensor, v1: torch.Tensor, scale0, scale1, base: torch.Tensor | None) -> torch.Tensor:
    """scale0 · v0 + scale1 · v1 [+ base], in v0's memory (v1 is overwritten too when the scales are per vector)."""
    if isinstance(scale0, float):
        merged = combine([scale0, scale1], [v0, v1], in_place=True)
    else:
        merged = v0.mul_(scale0.to(v0.dtype)).add_(v1.mul_(scale1.to(v1.dtype)))
    return merged if base is None else merged.add_(base)


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[NuslerpModelParams],
    method_params: NuslerpParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[base +] sin((1−t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁, v_i = x_i [− base], θ per tensor, row or column."""
    t = interpolation_t(model_params, method_params)
    v0, v1 = _vectors(tensors, base)
    dim = _reduced_dim(method_params)
    if dim is None:
        products = gram([v0, v1])
        dot, norm0, norm1 = products[0, 1], products[0, 0].sqrt(), products[1, 1].sqrt()
        scale0, scale1 = (float(scale) for scale in scales(_cosine(dot, norm0, norm1), t))
        return _interpolate(v0, v1, scale0, scale1, base)
    dot, square0, square1 = _products(v0, v1, dim)
    scale0, scale1 = scales(_cosine(dot, square0.sqrt(), square1.sqrt()), t)
    return _interpolate(v0, v1, scale0, scale1, base)


def statistics(
    source: BlockSource,
    model_params: Sequence[NuslerpModelParams],
    method_params: NuslerpParams,
    generator: torch.Generator | None = None,
):
    """The interpolation weights of a whole tensor or of each column, from sums over row blocks (rows: None)."""
    t = interpolation_t(model_params, method_params)
    dim = _reduced_dim(method_params)
    if dim == -1:
        return None
    sums = None
    for _, base, tensors in source.blocks():
        v0, v1 = _vectors(tensors, base)
        if dim is None:
            products = gram([v0, v1])
            block = (products[0, 1], products[0, 0], products[1, 1])
        else:
            block = _products(v0, v1, 0)
        sums = block if sums is None else tuple(total + part for total, part in zip(sums, block, strict=True))
    assert sums is not None
    dot, square0, square1 = sums
    scale0, scale1 = scales(_cosine(dot, square0.sqrt(), square1.sqrt()), t)
    if dim is None:
        return float(scale0), float(scale1)
    return scale0, scale1


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[NuslerpModelParams],
    method_params: NuslerpParams,
    stats,
    first_entry: int,
) -> torch.Tensor:
    """One row block with the whole tensor's (or each column's) weights; row-wise vectors lie whole in a block."""
    if stats is None:
        return merge(tensors, base, model_params, method_params)
    v0, v1 = _vectors(tensors, base)
    return _interpolate(v0, v1, *stats, base)


register(
    MergeMethod(
        name="nuslerp",
        merge=merge,
        model_params=NuslerpModelParams,
        method_params=NuslerpParams,
        optional_base=True,
        model_count=2,
        two_pass=TwoPass(statistics=statistics, merge_block=merge_block),
    )
)
