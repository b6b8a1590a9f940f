"""Karcher mean: the point on the unit sphere that minimises the summed squared geodesic distance to the inputs.

Every input (base_model included, as mergekit 0.1.5 includes it) weighs 1/n. The unit vectors u_i = x_i/‖x_i‖
of inputs longer than `tol` are averaged by Riemannian gradient steps from their normalised mean:
tangent = Σ α_i θ_i/sin θ_i (u_i − cos θ_i · m), m ← cos‖tangent‖ m + sin‖tangent‖ tangent/‖tangent‖,
renormalised, until ‖tangent‖ < `tol` or `max_iter` steps; inputs within `tol` radians of m do not pull.
The result is m scaled by Σ_i ‖x_i‖/n. The mean stays in the inputs' span, so the iteration runs on
coefficients over the Gram matrix (float64) and the tensor is built once: whole tensors or row blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from moemerge.methods.inner_products import combine, gram
from moemerge.methods.registry import BlockSource, MergeMethod, NoParams, Params, TwoPass, register


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0)
    tol: float = Field(1e-5, ge=0.0)


def coefficients(products: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """k with result = Σ k_i x_i, from G_ij = x_i·x_j (float64)."""
    count = products.shape[0]
    norms = [math.sqrt(max(float(products[i, i]), 0.0)) for i in range(count)]
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return [0.0] * count
    units = torch.tensor(
        [[float(products[i, j]) / (norms[i] * norms[j]) for j in valid] for i in valid], dtype=torch.float64
    )
    alphas = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def norm(vector: torch.Tensor) -> float:
        return math.sqrt(max(float(vector @ units @ vector), 0.0))

    mean_norm = norm(alphas)
    mean = alphas / mean_norm if mean_norm >= tol else torch.eye(len(valid), dtype=torch.float64)[0]
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(mean)
        for position in range(len(valid)):
            theta = math.acos(float(dots[position]))
            if theta < tol:
                continue
            pull = -float(dots[position]) * mean
            pull[position] += 1.0
            tangent += float(alphas[position]) * theta / math.sin(theta) * pull
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * tangent / tangent_norm
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(norms) / count
    k = [0.0] * count
    for position, index in enumerate(valid):
        k[index] = scale * float(mean[position]) / norms[index]
    return k


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: KarcherParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(Σ ‖x_i‖/n) · argmin_m Σ_i d(m, x_i/‖x_i‖)², by at most `max_iter` gradient steps on the sphere."""
    if len(tensors) == 1:
        return tensors[0]
    return combine(coefficients(gram(tensors), method_params.max_iter, method_params.tol), tensors, in_place=True)


def statistics(
    source: BlockSource,
    model_params: Sequence[Params],
    method_params: KarcherParams,
    generator: torch.Generator | None = None,
) -> list[float]:
    """The coefficients from the Gram matrix summed over row blocks."""
    products = None
    for _, _, tensors in source.blocks():
        block = gram(tensors)
        products = block if products is None else products + block
    assert products is not None
    if products.shape[0] == 1:
        return [1.0]
    return coefficients(products, method_params.max_iter, method_params.tol)


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: KarcherParams,
    k: list[float],
    first_entry: int,
) -> torch.Tensor:
    return combine(k, tensors, in_place=True)


register(
    MergeMethod(
        name="karcher",
        merge=merge,
        model_params=NoParams,
        method_params=KarcherParams,
        base_is_input=True,
        two_pass=TwoPass(statistics=statistics, merge_block=merge_block),
    )
)
