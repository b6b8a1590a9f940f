"""SCE's and DARE's reused buffers and fused passes give the bits of the formulas they replace.

The references are the steps as they were: `torch.sum(δ * δ, dtype=torch.float64)` for the energies, `torch.var` for
the variances, a whole-block mask before the bool sign election, and one DARE drop per input (`random_cut_per_input`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_two_pass import Blocks

from moemerge.methods import sce, sparsify
from moemerge.methods.sparsify import keep_count, top_magnitude_mask


@pytest.mark.parametrize("numel", [1, 1000, 2**18, 2**18 + 5, 3 * 2**18 + 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_of_squares_has_the_bits_of_the_float64_sum_of_the_squares(numel, dtype) -> None:
    delta = torch.randn(numel, generator=torch.Generator().manual_seed(numel), dtype=dtype) * 0.01
    expected = float(torch.sum(delta * delta, dtype=torch.float64))
    scratch = torch.full((numel + 3,), float("nan"), dtype=torch.float64)  # larger than needed, not zeroed
    assert sce.sum_of_squares(delta, scratch) == expected
    assert torch.equal(delta, torch.randn(numel, generator=torch.Generator().manual_seed(numel), dtype=dtype) * 0.01)


def test_float64_scratch_reuses_a_large_enough_buffer_only() -> None:
    variance = torch.empty(100, dtype=torch.float32)
    reused = sce.float64_scratch(50, variance)
    assert reused.dtype == torch.float64 and reused.numel() == 50 and reused.data_ptr() == variance.data_ptr()
    assert sce.float64_scratch(51, variance).data_ptr() != variance.data_ptr()
    assert sce.float64_scratch(10).numel() == 10


@pytest.mark.parametrize("chunk", [1, 7, 2**16])
def test_entry_variance_in_small_chunks_has_the_bits_of_torch_var(monkeypatch, chunk) -> None:
    monkeypatch.setattr(sce, "VARIANCE_CHUNK", chunk)
    generator = torch.Generator().manual_seed(chunk)
    deltas = [(torch.randn(3001, generator=generator) * 0.01).bfloat16().float() for _ in range(3)]
    out = torch.full((3001,), float("nan"))
    assert torch.equal(sce.entry_variance(deltas, out), torch.stack(deltas).var(dim=0, unbiased=False))


@pytest.mark.parametrize(("topk", "models"), [(1.0, 3), (0.3, 3), (0.5, 1)])
def test_chunked_merge_across_real_chunk_boundaries_has_the_bits_of_the_whole_tensor_steps(topk, models) -> None:
    generator = torch.Generator().manual_seed(models)
    base = torch.randn(2**18 + 4099, generator=generator)
    deltas = [(torch.randn(base.shape, generator=generator) * 0.01).bfloat16().float() for _ in range(models)]
    deltas[0][::7] = 0.0  # zeros never agree; ties in the variance
    whole = sce._merge_whole([d.clone() for d in deltas], base, topk)
    chunked = sce._merge_in_chunks([d.clone() for d in deltas], base, topk)
    assert torch.equal(chunked.view(torch.int32), whole.view(torch.int32))


def old_block_statistics(source: Blocks, topk: float) -> tuple[torch.Tensor | None, list[float]]:
    """SCE's statistics as they were: variances by block, one whole mask, then each block's masked float64 sums."""
    selected = None
    if topk < 1.0:
        parts = []
        for _, base, tensors in source.blocks():
            parts.append(torch.stack([t - base for t in tensors]).var(dim=0, unbiased=False).reshape(-1))
        variance = torch.cat(parts)
        selected = top_magnitude_mask(variance, keep_count(topk, int(torch.count_nonzero(variance))))
    energies: list[float] = []
    for first, base, tensors in source.blocks():
        deltas = [(t - base).reshape(-1) for t in tensors]
        if selected is not None:
            deltas = [d * selected[first : first + d.numel()] for d in deltas]
        sums = [float(torch.sum(d * d, dtype=torch.float64)) for d in deltas]
        energies = [a + b for a, b in zip(energies, sums, strict=True)] if energies else sums
    return selected, sce.weights_of(energies, source.numel)


def old_elect_and_sum(deltas: list[torch.Tensor], weights: list[float], base: torch.Tensor) -> torch.Tensor:
    """The election as it was: a bool election, `torch.where` agreement, fresh temporaries."""
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    positive = total >= 0
    mixed, divisor = torch.zeros_like(deltas[0]), torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = torch.where(positive, delta > 0, delta < 0).to(delta.dtype)
        mixed.add_(delta * agrees, alpha=weight)
        divisor.add_(agrees, alpha=weight)
    return mixed.div_(divisor.clamp_(min=sce.WEIGHT_FLOOR)) + base


@pytest.mark.parametrize("topk", [1.0, 0.37])
@pytest.mark.parametrize("rows_per_block", [1, 7, 40])
def test_two_pass_statistics_and_blocks_have_the_bits_they_had(monkeypatch, topk, rows_per_block) -> None:
    monkeypatch.setattr(sparsify, "BRACKET_MIN_NUMEL", 1)
    generator = torch.Generator().manual_seed(rows_per_block)
    base = torch.randint(-3, 4, (40, 9), generator=generator).float() / 4
    tensors = [base + torch.randint(-4, 5, (40, 9), generator=generator).float() / 8 for _ in range(3)]
    source = Blocks(base, tensors, rows_per_block)
    params = sce.SceParams(select_topk=topk)
    stats = sce.statistics(source, [sce.NoParams()] * 3, params)
    selected, weights = old_block_statistics(source, topk)
    assert stats.weights == weights
    if selected is None:
        assert stats.selected is None
    else:
        assert torch.equal(sparsify.unpack_keep(stats.selected, 0, source.numel), selected)
    for first, block_base, blocks in source.blocks():
        merged = sce.merge_block(blocks, block_base, [sce.NoParams()] * 3, params, stats, first)
        deltas = [t.reshape(-1)[first : first + block_base.numel()] - block_base.reshape(-1) for t in tensors]
        if selected is not None:
            deltas = [d * selected[first : first + d.numel()] for d in deltas]
        expected = old_elect_and_sum(deltas, weights, block_base.reshape(-1)).reshape(block_base.shape)
        assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))


def random_cut_per_input(source, model: int, density: float, rescale: bool, generator) -> sparsify.RandomCut:
    """The reference: one input's DARE drop as the two-pass statistics took it before `random_cuts` (masks drawn
    as the blocks of that input arrive, its L1 sums from its own pass over the blocks)."""
    if density >= 1.0:
        return sparsify.RandomCut(keep=None)
    numel = source.numel
    packed = np.empty((numel + 7) // 8, dtype=np.uint8)
    step = -(-sparsify.DRAW_CHUNK // 8) * 8
    if not rescale:
        for start, keep in sparsify._keep_chunks(numel, density, generator, step):
            sparsify.pack_into(packed, start, keep)
        return sparsify.RandomCut(keep=None, packed_keep=packed)
    l1_before = l1_kept = 0.0
    chunks = sparsify._keep_chunks(numel, density, generator, step)
    drawn = 0
    for first, magnitude in sparsify._block_magnitudes(source, model):
        l1_before += sparsify.l1_norm(magnitude)
        while drawn < first + magnitude.numel():
            start, keep = next(chunks)
            sparsify.pack_into(packed, start, keep)
            drawn = start + keep.numel()
        cut = sparsify.RandomCut(keep=None, packed_keep=packed)
        l1_kept += sparsify.l1_norm(sparsify.apply_random_cut(magnitude, cut, first))
    for start, keep in chunks:
        sparsify.pack_into(packed, start, keep)
    return sparsify.RandomCut(keep=None, factor=l1_before / l1_kept if l1_kept > 0.0 else 1.0, packed_keep=packed)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("rows_per_block", [1, 6, 30])
def test_dare_cuts_drawn_first_are_the_cuts_drawn_per_input(monkeypatch, rescale, rows_per_block) -> None:
    monkeypatch.setattr(sparsify, "DRAW_CHUNK", 64)
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(30, 8, generator=generator)
    tensors = [base + torch.randn(30, 8, generator=generator) * 0.1 for _ in range(3)]
    densities = [0.3, 1.0, 0.7]
    source = Blocks(base, tensors, rows_per_block)
    together, apart = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    cuts = sparsify.random_cuts(source, densities, rescale, together)
    expected = [random_cut_per_input(source, i, d, rescale, apart) for i, d in enumerate(densities)]
    for cut, reference in zip(cuts, expected, strict=True):
        assert cut.keep is None and cut.factor == reference.factor
        assert (cut.packed_keep is None) == (reference.packed_keep is None)
        if cut.packed_keep is not None:
            assert np.array_equal(cut.packed_keep, reference.packed_keep)
    assert torch.equal(torch.rand(5, generator=together), torch.rand(5, generator=apart))  # the same draws used


def test_thread_scratch_is_reused_and_grown_per_thread() -> None:
    import threading

    first = sce.SCRATCH.get(1000)
    assert sce.SCRATCH.get(10).data_ptr() == first.data_ptr()  # reused: no fresh pages for a smaller tensor
    grown = sce.SCRATCH.get(5000)
    assert grown.numel() == 5000 and sce.SCRATCH.get(4000).data_ptr() == grown.data_ptr()
    other: list[int] = []
    worker = threading.Thread(target=lambda: other.append(sce.SCRATCH.get(10).data_ptr()))
    worker.start()
    worker.join()
    assert other[0] != grown.data_ptr()  # each worker thread has its own


def test_giant_scratch_is_not_kept_and_two_pass_statistics_release_it(monkeypatch) -> None:
    monkeypatch.setattr(sce.SCRATCH, "retained", 100)
    kept = sce.SCRATCH.get(100)
    assert sce.SCRATCH.get(101).data_ptr() != kept.data_ptr()
    assert sce.SCRATCH.get(50).data_ptr() == kept.data_ptr()  # the giant did not replace the kept buffer
    base = torch.zeros(4, 3)
    sce.statistics(Blocks(base, [base + 1, base - 1], 2), [sce.NoParams()] * 2, sce.SceParams())
    assert sce.SCRATCH.kept is None


def test_transposed_and_empty_inputs_merge_as_their_contiguous_copies() -> None:
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(30, 20, generator=generator)
    tensors = [base + torch.randn(30, 20, generator=generator) * 0.1 for _ in range(3)]
    params = sce.SceParams(select_topk=0.4)
    transposed = sce.merge([t.clone().t() for t in tensors], base.t(), [sce.NoParams()] * 3, params)
    contiguous = sce.merge([t.t().contiguous() for t in tensors], base.t().contiguous(), [sce.NoParams()] * 3, params)
    assert torch.equal(transposed, contiguous)
    variance = torch.empty(30, 20).t()  # a non-contiguous out, shaped as the transposed inputs
    assert torch.equal(sce.entry_variance([t.t() for t in tensors], variance), torch.stack(tensors).var(0, False).t())
    empty = torch.empty(0, 4)
    assert sce.merge([empty.clone(), empty.clone()], empty, [sce.NoParams()] * 2, params).shape == (0, 4)
