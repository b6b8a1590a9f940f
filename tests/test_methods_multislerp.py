"""Multi-SLERP against the tangent-space algorithm written on the vectors themselves."""

from __future__ import annotations

import math

import pytest
import torch
from methods_support import run_merge

from moemerge.errors import TensorError

GEN = torch.Generator().manual_seed(3)
BASE = torch.randn(4, 6, generator=GEN, dtype=torch.float64)
TENSORS = [BASE + 0.5 * torch.randn(4, 6, generator=GEN, dtype=torch.float64) for _ in range(3)]
WEIGHTS = [0.5, 1.0, 1.5]


def multislerp(vectors: list[list[float]], weights: list[float], eps: float = 1e-8) -> list[float]:
    """Project to the sphere, average in the tangent space at the weighted mean, map back, rescale."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    norms = [math.sqrt(dot(v, v)) for v in vectors]
    units = [[x / (n + eps) for x in v] for v, n in zip(vectors, norms, strict=True)]
    mean = [sum(w * u[i] for w, u in zip(weights, units, strict=True)) for i in range(len(units[0]))]
    mean_norm = math.sqrt(dot(mean, mean))
    mean = [m / mean_norm for m in mean]
    tangents = [[x - dot(u, mean) * m for x, m in zip(u, mean, strict=True)] for u in units]
    tangent = [sum(w * t[i] for w, t in zip(weights, tangents, strict=True)) for i in range(len(mean))]
    length = math.sqrt(dot(tangent, tangent)) + eps
    point = [m * math.cos(length) + t * math.sin(length) / length for m, t in zip(mean, tangent, strict=True)]
    scale = sum(n * w for n, w in zip(norms, weights, strict=True))
    return [p * scale for p in point]


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_matches_the_tangent_space_algorithm(with_base: bool, normalize_weights: bool) -> None:
    base = BASE if with_base else None
    models = [{"weight": w} for w in WEIGHTS]
    merged = run_merge("multislerp", TENSORS, base, models, {"normalize_weights": normalize_weights})
    weights = [w / sum(WEIGHTS) for w in WEIGHTS] if normalize_weights else WEIGHTS
    vectors = [(t - BASE if with_base else t).reshape(-1).tolist() for t in TENSORS]
    expected = torch.tensor(multislerp(vectors, weights), dtype=torch.float64).reshape(BASE.shape)
    assert torch.allclose(merged, expected + (BASE if with_base else 0), atol=1e-10)


def test_one_model_is_returned_and_antipodal_inputs_fall_back_or_fail() -> None:
    assert torch.equal(run_merge("multislerp", TENSORS[:1], BASE, [{"weight": 1.0}]), TENSORS[0])
    x = TENSORS[0]
    linear = run_merge("multislerp", [x, -x], None, [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.allclose(linear, torch.zeros_like(x), atol=1e-12)  # w₀ x + w₁ (−x) with w = ½, ½
    with pytest.raises(TensorError, match="weighted mean"):
        run_merge("multislerp", [x, -x, x, -x], None, [{"weight": 1.0}] * 4)
