"""DELLA: rank-dependent keep probabilities, seeded masks, L1 rescaling, and the formula given the drawn masks."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge

from moemerge.methods import get_method

GEN = torch.Generator().manual_seed(0)
BASE = torch.randn(24, 16, generator=GEN, dtype=torch.float64)
TENSORS = [BASE + 0.1 * torch.randn(24, 16, generator=GEN, dtype=torch.float64) for _ in range(3)]
MODELS = [
    {"weight": 1.0, "density": 0.3, "epsilon": 0.1},
    {"weight": 0.5, "density": 0.6, "epsilon": 0.2},
    {"weight": 2.0, "density": 1.0},
]


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_same_seed_same_bytes_other_seed_differs(name: str) -> None:
    first = run_merge(name, TENSORS, BASE, MODELS, seed=42)
    assert torch.equal(first, run_merge(name, TENSORS, BASE, MODELS, seed=42))
    assert not torch.equal(first, run_merge(name, TENSORS, BASE, MODELS, seed=43))


def test_keep_probability_rises_linearly_with_the_magnitude_rank() -> None:
    """Each row is a permutation of 1..n: rank r keeps with (d − ε) + 2ε r/(n − 1), here 0.2 … 0.6."""
    rows, width = 4000, 5
    generator = torch.Generator().manual_seed(3)
    magnitudes = torch.stack([torch.randperm(width, generator=generator) + 1.0 for _ in range(rows)])
    merged = run_merge(
        "della_linear",
        [magnitudes],
        torch.zeros(rows, width),
        [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}],
        {"rescale": False},
        seed=5,
    )
    for rank in range(width):
        kept = float((merged[magnitudes == rank + 1] != 0).double().mean())
        assert kept == pytest.approx(0.2 + 0.4 * rank / (width - 1), abs=0.03)  # ≥ 3.5 standard deviations


def reference(seed: int, sign_consensus: bool, normalize: bool, lam: float, rescale: bool) -> torch.Tensor:
    """The formula with the masks redrawn: per model (density < 1) one torch.rand per entry in flat order."""
    generator = torch.Generator().manual_seed(seed)
    weighted = []
    for tensor, model in zip(TENSORS, MODELS, strict=True):
        delta = (tensor - BASE).tolist()
        density, epsilon = model["density"], model.get("epsilon", 0.15)
        if density < 1:
            draws = torch.rand(BASE.numel(), generator=generator).reshape(BASE.shape).tolist()
            kept = []
            for row, draw_row in zip(delta, draws, strict=True):
                order = sorted(range(len(row)), key=lambda i: (abs(row[i]), i))  # stable: ties by index
                rank = {column: position for position, column in enumerate(order)}
                p = [(density - epsilon) + 2 * epsilon * rank[i] / (len(row) - 1) for i in range(len(row))]
                kept.append([v if draw < p[i] else 0.0 for i, (v, draw) in enumerate(zip(row, draw_row, strict=True))])
        else:
            kept = delta
        flat_delta = [v for row in delta for v in row]
        flat_kept = [v for row in kept for v in row]
        factor = sum(map(abs, flat_delta)) / sum(map(abs, flat_kept)) if rescale else 1.0
        weighted.append([model["weight"] * factor * v for v in flat_kept])
    weights = [model["weight"] for model in MODELS]
    result = []
    for i, b in enumerate(BASE.reshape(-1).tolist()):
        values = [w[i] for w in weighted]
        if sign_consensus:
            positive = sum(values) >= 0
            agree = [v != 0 and (v > 0) == positive for v in values]
        else:
            agree = [True] * len(values)
        mixed = sum(v for v, a in zip(values, agree, strict=True) if a)
        divisor = sum(w for w, a in zip(weights, agree, strict=True) if a)
        if normalize:
            mixed /= divisor if divisor != 0 else 1.0
        result.append(b + lam * mixed)
    return torch.tensor(result, dtype=torch.float64).reshape(BASE.shape)


@pytest.mark.parametrize("name, sign_consensus", [("della", True), ("della_linear", False)])
@pytest.mark.parametrize("normalize, rescale", [(False, True), (True, False)])
def test_formula_given_the_drawn_masks(name: str, sign_consensus: bool, normalize: bool, rescale: bool) -> None:
    params = {"normalize": normalize, "lambda": 0.7, "rescale": rescale}
    merged = run_merge(name, TENSORS, BASE, MODELS, params, seed=9)
    assert torch.allclose(merged, reference(9, sign_consensus, normalize, 0.7, rescale), atol=1e-12)


def test_rescale_restores_the_l1_norm_and_density_one_is_task_arithmetic() -> None:
    x = TENSORS[0]
    merged = run_merge("della_linear", [x], BASE, [{"weight": 1.0, "density": 0.5}], seed=1)
    assert float((merged - BASE).abs().sum()) == pytest.approx(float((x - BASE).abs().sum()), rel=1e-9)
    models = [{"weight": w} for w in (1.0, 0.5, 2.0)]
    params = {"normalize": True, "lambda": 0.8}
    della = run_merge("della_linear", TENSORS, BASE, models, params, seed=1)
    assert torch.equal(della, run_merge("task_arithmetic", TENSORS, BASE, models, params))
    assert torch.equal(
        run_merge("della", TENSORS, BASE, models, params, seed=2), run_merge("ties", TENSORS, BASE, models, params)
    )


def test_one_dimensional_tensors_rank_as_one_row_and_density_zero_keeps_the_base() -> None:
    base = torch.zeros(2000)
    x = torch.arange(1, 2001, dtype=torch.float32)
    merged = run_merge(
        "della_linear", [x], base, [{"weight": 1.0, "density": 0.5, "epsilon": 0.4}], {"rescale": False}, seed=0
    )
    kept = merged != 0
    assert float(kept[:500].float().mean()) < 0.3 < 0.7 < float(kept[-500:].float().mean())
    assert torch.equal(run_merge("della", [x], base, [{"weight": 1.0, "density": 0.0}], seed=0), base)


def test_needs_a_generator() -> None:
    assert get_method("della").random
    with pytest.raises(ValueError, match="generator"):
        run_merge("della", TENSORS, BASE, MODELS)
