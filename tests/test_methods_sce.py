"""SCE against select-calculate-erase written entry by entry."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge

GEN = torch.Generator().manual_seed(5)
BASE = torch.randn(8, 5, generator=GEN, dtype=torch.float64)
TENSORS = [BASE + torch.randn(8, 5, generator=GEN, dtype=torch.float64) for _ in range(3)]


def sce(base: list[float], tensors: list[list[float]], topk: float) -> list[float]:
    deltas = [[x - b for x, b in zip(t, base, strict=True)] for t in tensors]
    n = len(base)
    if topk < 1:
        variances = []
        for i in range(n):
            column = [d[i] for d in deltas]
            mean = sum(column) / len(column)
            variances.append(sum((c - mean) ** 2 for c in column) / len(column))
        k = int(sum(v != 0 for v in variances) * topk)
        chosen = set(sorted(range(n), key=lambda i: (-variances[i], i))[:k])
        deltas = [[v if i in chosen else 0.0 for i, v in enumerate(d)] for d in deltas]
    energies = [sum(v * v for v in d) / n for d in deltas]
    total = sum(energies)
    weights = [e / total for e in energies] if abs(total) >= 1e-6 else [1 / len(deltas)] * len(deltas)
    result = []
    for i in range(n):
        positive = sum(d[i] for d in deltas) >= 0
        agree = [d[i] != 0 and (d[i] > 0) == positive for d in deltas]
        mixed = sum(w * d[i] for w, d, a in zip(weights, deltas, agree, strict=True) if a)
        divisor = sum(w for w, a in zip(weights, agree, strict=True) if a)
        result.append(base[i] + mixed / max(divisor, 1e-6))
    return result


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_matches_the_entrywise_formula(topk: float) -> None:
    merged = run_merge("sce", TENSORS, BASE, [{}] * 3, {"select_topk": topk, "int8_mask": True})
    expected = sce(BASE.reshape(-1).tolist(), [t.reshape(-1).tolist() for t in TENSORS], topk)
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_small_task_vectors_weigh_equally() -> None:
    """Σ mean(δ²) below 1e-6: uniform weights, so the result is the sign-agreeing mean (mergekit's rule)."""
    tensors = [BASE + 1e-4 * (t - BASE) for t in TENSORS]
    merged = run_merge("sce", tensors, BASE, [{}] * 3)
    expected = sce(BASE.reshape(-1).tolist(), [t.reshape(-1).tolist() for t in tensors], 1.0)
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.37, 0.0])
def test_chunks_give_the_bits_of_whole_tensors_even_with_ties_at_the_cut(monkeypatch, topk: float) -> None:
    from moemerge.methods import sce as sce_module
    from moemerge.methods import sparsify

    monkeypatch.setattr(sparsify, "BRACKET_MIN_NUMEL", 1)  # the bracketed cut on a tiny tensor
    monkeypatch.setattr(sparsify, "SELECT_CHUNK", 50)
    monkeypatch.setattr(sce_module, "MERGE_CHUNK", 13)
    generator = torch.Generator().manual_seed(int(topk * 100))
    base = torch.randint(-3, 4, (40, 9), generator=generator).float() / 4
    # small integer deltas: equal variances straddle the selection cut, so the lowest-index tie rule is exercised
    deltas = [torch.randint(-4, 5, (40, 9), generator=generator).float() / 8 for _ in range(3)]
    chunked = sce_module._merge_in_chunks([d.clone() for d in deltas], base, topk)
    whole = sce_module._merge_whole([d.clone() for d in deltas], base, topk)
    assert torch.equal(chunked, whole)
    assert torch.equal(whole, base) == (topk == 0.0)  # select_topk 0 selects nothing: the base


@pytest.mark.parametrize("models", [1, 2, 3, 5])
def test_entry_variance_has_the_bits_of_torch_var(models: int) -> None:
    from moemerge.methods.sce import entry_variance

    generator = torch.Generator().manual_seed(models)
    deltas = [(torch.randn(20011, generator=generator) * 0.01).bfloat16().float() for _ in range(models)]
    deltas[-1][:100] = deltas[0][:100]  # some entries equal in every model where there are several: variance 0
    expected = torch.stack(deltas).var(dim=0, unbiased=False)
    kept = [delta.clone() for delta in deltas]
    assert torch.equal(entry_variance(deltas, torch.empty(20011)), expected)
    assert all(torch.equal(a, b) for a, b in zip(deltas, kept, strict=True))  # the inputs are left as they were


@pytest.mark.parametrize("topk", [1.0, 0.37])
@pytest.mark.parametrize("rows_per_block", [1, 7, 40])
def test_row_blocks_select_and_sum_as_the_whole_tensor(monkeypatch, topk: float, rows_per_block: int) -> None:
    from test_two_pass import merge_both_ways

    from moemerge.methods import sparsify

    monkeypatch.setattr(sparsify, "BRACKET_MIN_NUMEL", 1)
    generator = torch.Generator().manual_seed(rows_per_block)
    base = torch.randint(-3, 4, (40, 9), generator=generator).float() / 4
    tensors = [base + torch.randint(-4, 5, (40, 9), generator=generator).float() / 8 for _ in range(3)]
    whole, blocked = merge_both_ways("sce", base, tensors, [{}] * 3, {"select_topk": topk}, rows_per_block)
    # the weights' float64 sums by block may differ in their last bits; the selection and election do not
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-7)
    assert torch.equal(blocked == base, whole == base)
