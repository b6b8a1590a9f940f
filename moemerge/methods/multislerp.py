"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere (Goddard, 2024).

Each v_i (x_i, or x_i − base with a base) is projected to the unit sphere, u_i = v_i / (‖v_i‖ + eps); the
weighted mean m = Σ w_i u_i fixes a tangent space at m̂ = m/‖m‖; the tangent vectors u_i − (u_i·m̂) m̂ are
averaged with the same weights into T, mapped back with the exponential map m̂ cos‖T‖ + T sin‖T‖/‖T‖
(‖T‖ + eps, as mergekit 0.1.5), and scaled to the weighted mean length Σ w_i ‖v_i‖. Every step stays in the
span of the v_i, so the result is Σ k_i v_i with k from the Gram matrix (float64): whole tensors or row blocks.
One model is returned unchanged; when m ≈ 0, two models fall back to w₀ v₀ + w₁ v₁ and more are an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moemerge.errors import ConfigError, TensorError
from moemerge.methods.inner_products import combine, gram
from moemerge.methods.registry import BlockSource, MergeMethod, Params, TwoPass, register


class MultislerpModelParams(Params):
    weight: float


class MultislerpParams(Params):
    normalize_weights: bool = True  # divide the weights by their sum
    eps: float = 1e-8


def coefficients(products: torch.Tensor, weights: Sequence[float], eps: float) -> list[float]:
    """k with result = Σ k_i v_i, from G_ij = v_i·v_j (float64)."""
    w = torch.tensor(weights, dtype=torch.float64)
    norms = products.diagonal().clamp(min=0).sqrt()
    scale = norms + eps
    units = products / torch.outer(scale, scale)  # u_i·u_j
    mean_norm = math.sqrt(max(float(w @ units @ w), 0.0))
    if mean_norm < eps:
        if len(weights) == 2:
            return [float(weight) for weight in w]
        raise TensorError(
            "multislerp: the weighted mean of the unit vectors is zero (antipodal inputs with balancing weights); "
            "change the weights"
        )
    mean = w / mean_norm  # m̂, as coefficients over the u_i
    dots = units @ mean  # u_i·m̂
    tangent = w - float(w @ dots) * mean  # Σ w_i (u_i − (u_i·m̂) m̂)
    tangent_norm = math.sqrt(max(float(tangent @ units @ tangent), 0.0)) + eps
    on_sphere = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    length = float(norms @ w)
    return [float(k) for k in on_sphere * length / scale]


def _weights(model_params: Sequence[MultislerpModelParams], method_params: MultislerpParams) -> list[float]:
    weights = [params.weight for params in model_params]
    if method_params.normalize_weights:
        total = sum(weights)
        if total == 0:
            raise ConfigError("weight: the multislerp weights sum to 0, so normalize_weights cannot divide by them")
        weights = [weight / total for weight in weights]
    return weights


def _result(k: Sequence[float], tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """Σ k_i v_i [+ base] = Σ k_i x_i + (1 − Σ k_i) base."""
    if base is None:
        return combine(k, tensors, in_place=True)
    return combine([*k, 1.0 - sum(k)], [*tensors, base], in_place=True)


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[MultislerpModelParams],
    method_params: MultislerpParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[base +] Σ_i w_i ‖v_i‖ · exp_m̂(Σ_i w_i log_m̂ u_i), first order (mergekit's tangent-space average)."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    products = gram([tensor.to(dtype) for tensor in tensors], origin=base)  # offsets from the base a chunk at a time
    k = coefficients(products, _weights(model_params, method_params), method_params.eps)
    return _result(k, tensors, base)


def statistics(
    source: BlockSource,
    model_params: Sequence[MultislerpModelParams],
    method_params: MultislerpParams,
    generator: torch.Generator | None = None,
) -> list[float] | None:
    """The coefficients k from the Gram matrix summed over row blocks."""
    if len(model_params) == 1:
        return None
    products = None
    for _, base, tensors in source.blocks():
        block = gram([tensor if base is None else tensor.sub_(base) for tensor in tensors])
        products = block if products is None else products + block
    assert products is not None
    return coefficients(products, _weights(model_params, method_params), method_params.eps)


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[MultislerpModelParams],
    method_params: MultislerpParams,
    k: list[float] | None,
    first_entry: int,
) -> torch.Tensor:
    if k is None:
        return tensors[0]
    return _result(k, tensors, base)


register(
    MergeMethod(
        name="multislerp",
        merge=merge,
        model_params=MultislerpModelParams,
        method_params=MultislerpParams,
        optional_base=True,
        two_pass=TwoPass(statistics=statistics, merge_block=merge_block),
    )
)
