"""TIES against hand-worked examples and an independent per-entry loop with a full-sort trim."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge, top_k_by_sort

from moemerge.methods import get_method


def test_two_models_sign_tie_zeros_and_zero_divisor() -> None:
    base = torch.zeros(4)
    x1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    x2 = torch.tensor([-1.0, 2.0, -1.0, 0.0])
    # Σ δ = [0, 0, 2, 0]: every elected sign is + (a zero total counts as +).
    # entry 0 keeps x1's +1, entry 1 keeps x2's +2, entry 2 keeps x1's +3; entry 3: zeros never agree,
    # so nothing is kept there and the zero divisor counts as 1.
    merged = run_merge("ties", [x1, x2], base, [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(merged, torch.tensor([1.0, 2.0, 3.0, 0.0]))


BASE3 = torch.ones(4, dtype=torch.float64)
DELTAS3 = [
    torch.tensor([0.4, -0.2, 0.1, 0.0], dtype=torch.float64),
    torch.tensor([0.6, 0.8, -0.4, 0.2], dtype=torch.float64),
    torch.tensor([-0.3, -0.1, -0.2, 0.0], dtype=torch.float64),
]
MODELS3 = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}, {"weight": 2.0, "density": 0.5}]
# Trimmed to 2 of 4 entries each: [.4,-.2,0,0], [.6,.8,0,0], [-.3,0,-.2,0]
# weighted:                        [.4,-.2,0,0], [.3,.4,0,0], [-.6,0,-.4,0]; sum [.1,.2,-.4,0] → signs [+,+,−,+]
# agreeing weighted sums [.7, .4, −.4, 0] over agreeing weights [1.5, .5, 2, 0→1]


def test_three_models_with_trim_and_normalize() -> None:
    merged = run_merge("ties", [BASE3 + d for d in DELTAS3], BASE3, MODELS3)
    expected = BASE3 + torch.tensor([0.7 / 1.5, 0.4 / 0.5, -0.4 / 2.0, 0.0], dtype=torch.float64)
    assert torch.allclose(merged, expected, atol=1e-12)


def test_three_models_without_normalize_with_lambda() -> None:
    merged = run_merge("ties", [BASE3 + d for d in DELTAS3], BASE3, MODELS3, {"normalize": False, "lambda": 0.5})
    expected = BASE3 + 0.5 * torch.tensor([0.7, 0.4, -0.4, 0.0], dtype=torch.float64)
    assert torch.allclose(merged, expected, atol=1e-12)


def ties_reference(base, tensors, weights, densities, normalize, lam):  # noqa: ANN001, ANN201
    """Straightforward per-entry TIES: full-sort trim, then loops over entries and models."""
    base_values = base.reshape(-1).tolist()
    n = len(base_values)
    trimmed = []
    for tensor, density in zip(tensors, densities, strict=True):
        delta = [x - b for x, b in zip(tensor.reshape(-1).tolist(), base_values, strict=True)]
        keep = top_k_by_sort(delta, int(density * n)) if density < 1 else set(range(n))
        trimmed.append([d if i in keep else 0.0 for i, d in enumerate(delta)])
    result = []
    for i in range(n):
        weighted = [w * t[i] for w, t in zip(weights, trimmed, strict=True)]
        elected = 1.0 if sum(weighted) >= 0 else -1.0
        agree = [v != 0 and (v > 0) == (elected > 0) for v in weighted]
        mixed = sum(v for v, a in zip(weighted, agree, strict=True) if a)
        divisor = sum(w for w, a in zip(weights, agree, strict=True) if a)
        if normalize:
            mixed /= divisor if divisor != 0 else 1.0
        result.append(base_values[i] + lam * mixed)
    return torch.tensor(result, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_random_tensors_match_reference(normalize: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(9, 13, generator=generator, dtype=torch.float64)
    # rounded deltas: many equal magnitudes, so the trim's tie rule matters
    tensors = [base + torch.randint(-4, 5, (9, 13), generator=generator).double() / 8 for _ in range(3)]
    weights, densities = [0.7, 1.3, -0.4], [0.3, 0.55, 1.0]
    models = [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    merged = run_merge("ties", tensors, base, models, {"normalize": normalize, "lambda": 0.8})
    expected = ties_reference(base, tensors, weights, densities, normalize, 0.8)
    assert torch.allclose(merged, expected, atol=1e-12)


def test_density_defaults_to_one_and_single_model_returns_it() -> None:
    base = torch.tensor([0.0, 1.0, 2.0])
    x = torch.tensor([0.5, 0.0, 2.5])
    assert torch.allclose(run_merge("ties", [x], base, [{"weight": 0.3}]), x)  # normalize divides the weight out


def test_agreeing_weights_that_cancel_leave_the_divisor_at_one() -> None:
    # w = [1, −1], δ = [+1, −1]: both weighted deltas are +1 and agree, but Σ m_i w_i = 0 → divide by 1
    base = torch.zeros(2)
    merged = run_merge(
        "ties", [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], base, [{"weight": 1}, {"weight": -1}]
    )
    assert torch.equal(merged, torch.tensor([2.0, 0.0]))


def test_rescale_scales_the_trimmed_task_vector_back_to_its_l1_norm() -> None:
    base = torch.zeros(4, dtype=torch.float64)
    x = torch.tensor([4.0, -1.0, 2.0, -3.0], dtype=torch.float64)
    # trimmed to [4, 0, 0, −3] (L1 7), scaled to the full L1 10
    merged = run_merge("ties", [x], base, [{"weight": 1.0, "density": 0.5}], {"rescale": True})
    assert torch.allclose(merged, torch.tensor([40 / 7, 0.0, 0.0, -30 / 7], dtype=torch.float64), atol=1e-12)
    plain = run_merge("ties", [x], base, [{"weight": 1.0, "density": 0.5}])
    assert torch.equal(plain, torch.tensor([4.0, 0.0, 0.0, -3.0], dtype=torch.float64))


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "task_arithmetic"])
def test_the_shared_base_is_left_untouched_while_inputs_are_consumed(name: str) -> None:
    """Task vectors are built in the inputs' memory (one copy less per model); the base, shared, must survive."""
    method = get_method(name)
    base = torch.tensor([0.5, -0.5, 1.0, 2.0])
    tensors = [torch.tensor([1.0, -2.0, 0.0, 2.5]), torch.tensor([0.0, 0.5, 3.0, 1.0])]
    models = [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.5}]
    if name == "task_arithmetic":
        models = [{"weight": 1.0}, {"weight": 0.7}]
    expected = run_merge(name, tensors, base, models, {"rescale": True} if name != "task_arithmetic" else {}, seed=0)
    merged = method.merge(
        tensors,
        base,
        [method.model_params.model_validate(m) for m in models],
        method.method_params.model_validate({"rescale": True} if name != "task_arithmetic" else {}),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(base, torch.tensor([0.5, -0.5, 1.0, 2.0]))
    assert torch.equal(merged, expected)
