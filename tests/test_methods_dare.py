"""DARE: seeded reproducibility, the keep fraction, L1 rescaling, and the formula given the drawn masks."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge

from moemerge.methods import get_method

GEN = torch.Generator().manual_seed(0)
BASE = torch.randn(64, 32, generator=GEN, dtype=torch.float64)
TENSORS = [BASE + 0.1 * torch.randn(64, 32, generator=GEN, dtype=torch.float64) for _ in range(3)]
MODELS = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": 2.0, "density": 0.9}]


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_same_seed_same_bytes_other_seed_differs(name: str) -> None:
    first = run_merge(name, TENSORS, BASE, MODELS, seed=42)
    assert torch.equal(first, run_merge(name, TENSORS, BASE, MODELS, seed=42))
    assert not torch.equal(first, run_merge(name, TENSORS, BASE, MODELS, seed=43))
    assert get_method(name).random


def test_kept_fraction_is_density_on_a_large_tensor() -> None:
    base = torch.zeros(100_000)
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(1)) + 0.5  # every delta non-zero
    merged = run_merge("dare_linear", [x], base, [{"weight": 1.0, "density": 0.25}], {"rescale": False}, seed=7)
    kept = merged != 0
    assert abs(float(kept.float().mean()) - 0.25) < 0.01  # 6 standard deviations
    assert torch.equal(merged[kept], x[kept])


def test_rescale_preserves_each_task_vectors_l1_norm() -> None:
    base = torch.zeros(20_000, dtype=torch.float64)
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    merged = run_merge("dare_linear", [x], base, [{"weight": 1.0, "density": 0.2}], seed=3)
    assert float(merged.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-9)
    kept = merged != 0
    factor = float(x.abs().sum() / x[kept].abs().sum())
    assert torch.allclose(merged[kept], factor * x[kept])


def expected_with_masks(seed: int, sign_consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """Formula given the masks: one torch.rand draw per model, in recipe order, kept where draw < density."""
    generator = torch.Generator().manual_seed(seed)
    weighted = []
    for tensor, model in zip(TENSORS, MODELS, strict=True):
        delta = (tensor - BASE).reshape(-1).tolist()
        keep = (torch.rand(BASE.shape, generator=generator) < model["density"]).reshape(-1).tolist()
        kept = [d if k else 0.0 for d, k in zip(delta, keep, strict=True)]
        factor = sum(abs(d) for d in delta) / sum(abs(k) for k in kept)
        weighted.append([model["weight"] * factor * k for k in kept])
    weights = [model["weight"] for model in MODELS]
    result = []
    for i, b in enumerate(BASE.reshape(-1).tolist()):
        values = [w[i] for w in weighted]
        if sign_consensus:
            elected = 1.0 if sum(values) >= 0 else -1.0
            agree = [v != 0 and (v > 0) == (elected > 0) for v in values]
        else:
            agree = [True] * len(values)
        mixed = sum(v for v, a in zip(values, agree, strict=True) if a)
        divisor = sum(w for w, a in zip(weights, agree, strict=True) if a)
        if normalize:
            mixed /= divisor if divisor != 0 else 1.0
        result.append(b + lam * mixed)
    return torch.tensor(result, dtype=torch.float64).reshape(BASE.shape)


@pytest.mark.parametrize("name, sign_consensus", [("dare_ties", True), ("dare_linear", False)])
@pytest.mark.parametrize("normalize", [False, True])
def test_formula_given_the_drawn_masks(name: str, sign_consensus: bool, normalize: bool) -> None:
    merged = run_merge(name, TENSORS, BASE, MODELS, {"normalize": normalize, "lambda": 0.7}, seed=9)
    assert torch.allclose(merged, expected_with_masks(9, sign_consensus, normalize, 0.7), atol=1e-12)


def test_density_one_equals_task_arithmetic_and_ties() -> None:
    models = [{"weight": w} for w in (1.0, 0.5, 2.0)]
    params = {"lambda": 0.8, "normalize": True, "int8_mask": True}
    dare_linear = run_merge("dare_linear", TENSORS, BASE, models, params, seed=1)
    assert torch.equal(dare_linear, run_merge("task_arithmetic", TENSORS, BASE, models, params))
    dare_ties = run_merge("dare_ties", TENSORS, BASE, models, params, seed=1)
    assert torch.equal(dare_ties, run_merge("ties", TENSORS, BASE, models, params))


def test_density_zero_returns_the_base() -> None:
    merged = run_merge("dare_ties", TENSORS[:1], BASE, [{"weight": 1.0, "density": 0.0}], seed=0)
    assert torch.equal(merged, BASE)


def test_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        run_merge("dare_ties", TENSORS, BASE, MODELS)
