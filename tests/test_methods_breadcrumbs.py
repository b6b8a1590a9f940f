"""Breadcrumbs against a hand-worked example."""

from __future__ import annotations

import torch
from methods_support import run_merge

BASE = torch.zeros(10, dtype=torch.float64)
X1 = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, -0.1, 0.2, 0.3], dtype=torch.float64)
X2 = torch.tensor([-1.0, 4.0, -3.0, -2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
MODELS = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}, {"weight": 1.0, "density": 0.2, "gamma": 0.1}]
# X1 drops 5.0 (top 10 %) and keeps the next five: [0, -4, 3, -2, 1, 0.5, 0, ...]
# X2 drops 4.0 and keeps the next two, −3 and −2.5: [0, 0, -3, -2.5, 0, ...]


def test_breadcrumbs_sums_the_pruned_task_vectors() -> None:
    merged = run_merge("breadcrumbs", [X1, X2], BASE, MODELS, {"normalize": False})
    expected = torch.tensor([0.0, -4.0, 0.0, -4.5, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(merged, expected)


def test_breadcrumbs_ties_elects_signs() -> None:
    merged = run_merge("breadcrumbs_ties", [X1, X2], BASE, MODELS, {"normalize": True})
    # entry 2: 3 − 3 = 0 elects +, keeps X1's 3 alone; entry 3: both −, averaged: −2.25
    expected = torch.tensor([0.0, -4.0, 3.0, -2.25, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(merged, expected)


def test_normalize_is_off_by_default_and_rescale_restores_l1() -> None:
    summed = run_merge("breadcrumbs_ties", [X1, X2], BASE, MODELS)
    assert torch.equal(summed, torch.tensor([0.0, -4.0, 3.0, -4.5, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    # X1 alone, rescaled: kept [-4, 3, -2, 1, 0.5] (L1 10.5) scaled to the full L1 16.1
    rescaled = run_merge("breadcrumbs", [X1], BASE, MODELS[:1], {"rescale": True})
    expected = torch.tensor([0.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64) * 16.1 / 10.5
    assert torch.allclose(rescaled, expected, atol=1e-12)
