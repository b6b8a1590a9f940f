"""The Karcher mean against the Riemannian iteration written on the vectors themselves."""

from __future__ import annotations

import math

import pytest
import torch
from methods_support import run_merge

GEN = torch.Generator().manual_seed(4)
TENSORS = [torch.randn(5, 4, generator=GEN, dtype=torch.float64) + 1.0 for _ in range(3)]


def karcher(vectors: list[list[float]], max_iter: int, tol: float) -> list[float]:
    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    norms = [math.sqrt(dot(v, v)) for v in vectors]
    valid = [i for i, n in enumerate(norms) if n > tol]
    units = [[x / norms[i] for x in vectors[i]] for i in valid]
    alpha = 1.0 / len(valid)
    mean = [alpha * sum(u[k] for u in units) for k in range(len(units[0]))]
    mean = [m / math.sqrt(dot(mean, mean)) for m in mean]
    for _ in range(max_iter):
        tangent = [0.0] * len(mean)
        for u in units:
            c = max(-1.0, min(1.0, dot(mean, u)))
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent = [
                t + alpha * theta / math.sin(theta) * (x - c * m) for t, x, m in zip(tangent, u, mean, strict=True)
            ]
        norm = math.sqrt(dot(tangent, tangent))
        if norm < tol:
            break
        mean = [math.cos(norm) * m + math.sin(norm) * t / norm for m, t in zip(mean, tangent, strict=True)]
        length = math.sqrt(dot(mean, mean))
        mean = [m / length for m in mean]
    scale = sum(norms) / len(vectors)
    return [scale * m for m in mean]


@pytest.mark.parametrize("max_iter, tol", [(10, 1e-5), (1, 1e-5), (50, 1e-12)])
def test_matches_the_iteration_on_vectors(max_iter: int, tol: float) -> None:
    merged = run_merge("karcher", TENSORS, None, [{}] * 3, {"max_iter": max_iter, "tol": tol})
    expected = karcher([t.reshape(-1).tolist() for t in TENSORS], max_iter, tol)
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-10)


def test_zero_inputs_do_not_pull_but_count_in_the_scale_and_one_input_is_returned() -> None:
    zero = torch.zeros_like(TENSORS[0])
    merged = run_merge("karcher", [TENSORS[0], TENSORS[1], zero], None, [{}] * 3)
    two = karcher([t.reshape(-1).tolist() for t in TENSORS[:2]], 10, 1e-5)
    assert torch.allclose(merged.reshape(-1), torch.tensor(two, dtype=torch.float64) * 2 / 3, atol=1e-10)
    assert torch.equal(run_merge("karcher", [zero, zero], None, [{}] * 2), zero)
    assert torch.equal(run_merge("karcher", TENSORS[:1], None, [{}]), TENSORS[0])
