"""Arcee Fusion: importance = |δ| · row KL divergence, kept at or above median + 1.5 IQR."""

from __future__ import annotations

import math

import torch
from methods_support import run_merge


def fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    rows_base, rows_other = base.reshape(-1, base.shape[-1]).tolist(), other.reshape(-1, other.shape[-1]).tolist()
    scores = []
    for row_b, row_x in zip(rows_base, rows_other, strict=True):

        def softmax(row):
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            return [e / sum(exps) + 1e-8 for e in exps]

        p, q = softmax(row_x), softmax(row_b)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        scores.append([abs(x - b) * kl for x, b in zip(row_x, row_b, strict=True)])
    flat = sorted(v for row in scores for v in row)
    quartile = [flat[int(q * (len(flat) - 1))] for q in (0.25, 0.5, 0.75)]
    threshold = quartile[1] + 1.5 * (quartile[2] - quartile[0])
    result = [
        [x if s >= threshold else b for x, b, s in zip(row_x, row_b, row_s, strict=True)]
        for row_x, row_b, row_s in zip(rows_other, rows_base, scores, strict=True)
    ]
    return torch.tensor(result, dtype=torch.float64).reshape(base.shape)


def test_matches_the_formula_and_keeps_only_the_outliers() -> None:
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(12, 16, generator=generator, dtype=torch.float64)
    other = base + 0.05 * torch.randn(12, 16, generator=generator, dtype=torch.float64)
    other[3] += 2.0 * torch.randn(16, generator=generator, dtype=torch.float64)  # one row that moved a lot
    merged = run_merge("arcee_fusion", [other], base, [{}])
    assert torch.allclose(merged, fusion(base, other), atol=1e-12)
    taken = merged != base
    assert taken[3].sum() > 8 and taken.sum() < 0.25 * taken.numel()


def test_a_vector_is_one_row() -> None:
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(40, generator=generator, dtype=torch.float64)
    other = base + torch.randn(40, generator=generator, dtype=torch.float64) ** 3
    assert torch.allclose(run_merge("arcee_fusion", [other], base, [{}]), fusion(base, other), atol=1e-12)
