"""Sparsification: selection-based top-k against a full sort, the tie rule, breadcrumbs cuts, DARE masks."""

from __future__ import annotations

import pytest
import torch
from methods_support import top_k_by_sort

from moemerge.methods.sparsify import (
    drop_random,
    keep_count,
    kth_largest,
    prune_magnitude,
    prune_outliers,
    top_magnitude_mask,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kept_positions(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask.reshape(-1).cpu()).reshape(-1).tolist())


def test_tie_rule_keeps_lowest_flat_index_at_the_threshold() -> None:
    delta = torch.tensor([0.5, -0.5, 0.1, 0.5, -0.5, 0.9])
    # k = 3: 0.9 is above the threshold 0.5; two of the four 0.5-magnitude entries fit: flat indices 0 and 1
    assert kept_positions(top_magnitude_mask(delta, 3)) == {5, 0, 1}
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.9])
    pruned = prune_magnitude(delta, 0.5)
    assert pruned is delta  # pruned in place: the methods own their task vectors
    assert torch.equal(pruned, expected)


def test_tie_rule_follows_row_major_order_in_2d() -> None:
    delta = torch.tensor([[1.0, 2.0], [2.0, 2.0]])
    mask = top_magnitude_mask(delta, 2)
    assert mask.tolist() == [[False, True], [True, False]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.29, 0.5, 0.7, 0.999])
def test_top_k_matches_full_sort_with_many_ties(device: str, dtype: torch.dtype, density: float) -> None:
    generator = torch.Generator().manual_seed(7)
    # small integers: plenty of equal magnitudes straddling every cut
    delta = (torch.randint(-6, 7, (23, 17), generator=generator).to(dtype) / 4).to(device)
    k = int(density * delta.numel())
    mask = top_magnitude_mask(delta, k)
    assert mask.shape == delta.shape and mask.device.type == device
    assert int(mask.sum()) == k
    assert kept_positions(mask) == top_k_by_sort(delta.reshape(-1).cpu().double().tolist(), k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_largest_matches_sorted_order(device: str, dtype: torch.dtype) -> None:
    values = torch.randint(0, 9, (501,), generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    descending = sorted(values.cpu().double().tolist(), reverse=True)
    for k in (1, 2, 100, 250, 251, 400, 500, 501):
        assert float(kth_largest(values, k)) == descending[k - 1], k


def test_pruned_count_is_exactly_int_density_times_numel() -> None:
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    for density in (0.0, 0.001, 0.29, 0.333, 0.5, 0.99):
        pruned = prune_magnitude(delta.clone(), density)
        assert int((pruned != 0).sum()) == int(density * 1000), density
        # survivors keep their values; the smallest survivor outranks every pruned entry
        survivors = pruned != 0
        assert torch.equal(pruned[survivors], delta[survivors])
        if 0 < int(survivors.sum()) < 1000:
            assert delta[survivors].abs().min() >= delta[~survivors].abs().max()


def test_edge_counts_and_shapes() -> None:
    delta = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    assert not top_magnitude_mask(delta, 0).any()
    assert top_magnitude_mask(delta, 4).all()
    assert top_magnitude_mask(delta, 9).all()
    assert prune_magnitude(delta, 1.0) is delta  # density 1 skips the work
    scalar = torch.tensor(-2.5)
    assert torch.equal(prune_magnitude(scalar.clone(), 0.5), scalar)  # int(0.5 · 1) = 0, but at least one is kept
    assert torch.equal(prune_magnitude(scalar, 1.0), scalar)
    assert top_magnitude_mask(scalar, 1).shape == ()
    assert torch.equal(prune_magnitude(torch.tensor([3.0]), 0.99), torch.tensor([3.0]))
    assert keep_count(0.5, 7) == 3 and keep_count(1.5, 7) == 7 and keep_count(-1.0, 7) == 0


def test_breadcrumbs_drops_top_outliers_and_bottom_magnitudes() -> None:
    delta = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, -0.1, 0.2, 0.3])
    # 10 entries: gamma 0.1 drops the single largest (5.0), density 0.5 keeps the next five
    expected = torch.tensor([0.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(prune_outliers(delta.clone(), 0.5, 0.1), expected)
    # density + gamma > 1: the outlier cut shrinks so that int(density · numel) entries survive
    assert int((prune_outliers(delta.clone(), 0.9, 0.3) != 0).sum()) == 9 - 1  # nine kept, one of them is the zero
    assert torch.equal(prune_outliers(delta, 1.0, 0.3), delta)


def test_breadcrumbs_matches_full_sort() -> None:
    delta = torch.randint(-5, 6, (31, 9), generator=torch.Generator().manual_seed(3)).float()
    values = delta.reshape(-1).tolist()
    n = len(values)
    for density, gamma in ((0.5, 0.1), (0.3, 0.05), (0.8, 0.2)):
        order = sorted(range(n), key=lambda i: (-abs(values[i]), i))
        top, kept = int(gamma * n), int(density * n)
        expected = torch.zeros(n)
        for i in order[top : top + kept]:
            expected[i] = values[i]
        assert torch.equal(prune_outliers(delta.clone(), density, gamma).reshape(-1), expected)


def test_dare_drop_is_reproducible_per_seed() -> None:
    delta = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    first = drop_random(delta.clone(), 0.3, True, torch.Generator().manual_seed(11))
    again = drop_random(delta.clone(), 0.3, True, torch.Generator().manual_seed(11))
    other = drop_random(delta.clone(), 0.3, True, torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dare_keeps_density_fraction_and_rescales_l1() -> None:
    delta = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    assert bool((delta != 0).all())
    for density in (0.1, 0.5, 0.9):
        plain = drop_random(delta.clone(), density, False, torch.Generator().manual_seed(1))
        kept = plain != 0
        # 100k Bernoulli draws: the standard deviation of the fraction is ≤ 0.0016
        assert abs(float(kept.float().mean()) - density) < 0.01
        assert torch.equal(plain[kept], delta[kept])
        rescaled = drop_random(delta.clone(), density, True, torch.Generator().manual_seed(1))
        assert torch.equal(rescaled != 0, kept)
        assert float(rescaled.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
        ratio = rescaled[kept] / delta[kept]  # one common factor, ‖δ‖₁ / ‖kept‖₁
        expected_factor = float(delta.abs().sum()) / float(delta[kept].abs().sum())
        assert torch.allclose(ratio, torch.full_like(ratio, expected_factor), rtol=1e-5)


def test_dare_edge_cases() -> None:
    delta = torch.tensor([1.0, -2.0, 3.0])
    generator = torch.Generator().manual_seed(0)
    assert drop_random(delta, 1.0, True, generator) is delta
    assert torch.equal(drop_random(delta.clone(), 0.0, True, generator), torch.zeros(3))  # nothing kept stays zero
    zeros = torch.zeros(5)
    assert torch.equal(drop_random(zeros, 0.5, True, generator), zeros)
    assert drop_random(torch.tensor(4.0), 0.5, True, generator).shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_get_the_cpu_seeded_mask() -> None:
    delta = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    on_cpu = drop_random(delta.clone(), 0.4, True, torch.Generator().manual_seed(5))
    on_gpu = drop_random(delta.cuda(), 0.4, True, torch.Generator().manual_seed(5))
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu() != 0, on_cpu != 0)
    assert torch.allclose(on_gpu.cpu(), on_cpu, rtol=1e-5)


def test_ties_keeps_at_least_one_entry_when_density_is_positive_as_mergekit_does() -> None:
    delta = torch.tensor([0.1, -0.7, 0.3, 0.2, 0.0, 0.05, -0.1, 0.4, 0.15, 0.25])
    # int(0.05 · 10) = 0, but a positive density keeps the single largest magnitude
    assert torch.equal(prune_magnitude(delta.clone(), 0.05), torch.tensor([0, -0.7, 0, 0, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(prune_magnitude(delta.clone(), 0.0), torch.zeros(10))


def _mask_of_cut(delta: torch.Tensor, cut) -> torch.Tensor:
    """The entries a MagnitudeCut keeps: |δ| above the threshold, and at it up to flat index `last_tie`."""
    if cut.keep_all:
        return torch.ones(delta.shape, dtype=torch.bool)
    magnitude = delta.abs().reshape(-1)
    at_cut = (magnitude == cut.threshold) & (torch.arange(magnitude.numel()) <= cut.last_tie)
    return ((magnitude > cut.threshold) | at_cut).reshape(delta.shape)


@pytest.mark.parametrize(
    "kind, density",
    [("ties", 0.0), ("ties", 0.001), ("ties", 0.5), ("ties", 0.97), ("ties", 1.0), ("distinct", 0.3), ("zeros", 0.5)],
)
def test_bracketed_cut_keeps_exactly_the_entries_of_the_full_selection(kind: str, density: float, monkeypatch) -> None:
    """The sampled bracket and the exact pass inside it give the mask of a selection over every magnitude."""
    import moemerge.methods.sparsify as sparsify
    from moemerge.methods.sparsify import BRACKET_MIN_NUMEL, magnitude_cut_of

    def no_full_selection(flat, k):
        raise AssertionError("the bracket missed")

    if 0.0 < density < 1.0:
        monkeypatch.setattr(sparsify, "_cut_by_full_selection", no_full_selection)

    generator = torch.Generator().manual_seed(int(density * 1000))
    shape = (BRACKET_MIN_NUMEL // 1000 + 3, 1000)  # above the size where the bracket is used
    if kind == "ties":  # few distinct magnitudes: ties straddle every cut
        delta = torch.randint(-6, 7, shape, generator=generator).float() / 8
    elif kind == "zeros":  # most entries zero, then the cut sits at 0
        delta = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.05)
    else:
        delta = torch.randn(shape, generator=generator)
    k = max(1, int(density * delta.numel())) if density > 0 else 0
    assert torch.equal(_mask_of_cut(delta, magnitude_cut_of(delta, density)), top_magnitude_mask(delta, k))


def test_a_bracket_that_misses_falls_back_to_the_full_selection(monkeypatch) -> None:
    import moemerge.methods.sparsify as sparsify

    delta = torch.randint(-50, 51, (1100, 1000), generator=torch.Generator().manual_seed(1)).float()
    expected = top_magnitude_mask(delta, int(0.4 * delta.numel()))
    calls = []
    monkeypatch.setattr(sparsify, "_sample_bracket", lambda flat, k: calls.append(k) or (0.0, 1.0))  # far too low
    assert torch.equal(_mask_of_cut(delta, sparsify.magnitude_cut_of(delta, 0.4)), expected) and calls
