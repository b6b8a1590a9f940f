"""SCE (Wan et al., 2024): select the entries where the task vectors disagree most, weigh, erase, merge.

Select: with `select_topk` < 1, keep int(select_topk · n) entries of largest variance across the task vectors
(the population variance, as `torch.var` computes it: see `entry_variance`),
n counting the entries of non-zero variance (ties at the cut go to the lowest flat index; mergekit's topk
keeps an arbitrary subset). Calculate: each task vector weighs s_i = mean(δ_i²) / Σ_j mean(δ_j²), uniform when
that sum is below 1e-6 (mergekit 0.1.5's rule, which small task vectors meet). Erase: entries whose sign
differs from the sign of Σ_i δ_i (zeros never agree) are dropped.
Merge: base + Σ_i s_i m_i δ_i / max(Σ_i s_i m_i, 1e-6).

On the CPU the variance, the selection (a bracketed cut of the variances) and the sum run a cache-sized chunk at a
time with the same per-entry operations as the whole-tensor steps, so the bits are the same; the energies s_i keep
their whole-tensor float64 sums. NaN/Inf and other devices take the whole-tensor steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from moemerge.finite import nonfinite_count
from moemerge.methods.registry import BlockSource, MergeMethod, NoParams, Params, TwoPass, register
from moemerge.methods.sparsify import cut_keeps, keep_count, top_count_cut, top_magnitude_mask, unpack_keep
from moemerge.methods.task_vectors import MERGE_CHUNK

WEIGHT_FLOOR = 1e-6


class SceParams(Params):
    select_topk: float = Field(1.0, ge=0.0, le=1.0)  # fraction of the varying entries kept
    int8_mask: bool = False  # mergekit's memory trick; accepted so recipes run unchanged, no effect on the math


def entry_variance(deltas: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The population variance of each entry across the task vectors, into `out`.

    Welford's steps in float64, entry by entry: the bits of `torch.var(torch.stack(deltas), dim=0, unbiased=False)`
    on the CPU (mergekit's way), measured 14× faster than that reduction over a stacked dimension, and elementwise,
    so chunks and whole tensors agree.
    """
    accumulate = torch.promote_types(out.dtype, torch.float64)
    mean = deltas[0].to(accumulate, copy=True)
    squares = torch.zeros_like(mean)
    for count, delta in enumerate(deltas[1:], start=2):
        wide = delta.to(accumulate, copy=True)  # never the caller's own (float64) tensor
        step = wide - mean
        mean += step / count
        squares += step.mul_(wide.sub_(mean))
    return out.copy_(squares.div_(len(deltas)))


def selection_mask(deltas: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """True on the int(select_topk · #non-zero variance) entries whose variance across the task vectors is largest."""
    variance = entry_variance(deltas, torch.empty_like(deltas[0]))
    count = keep_count(select_topk, int(torch.count_nonzero(variance)))
    return top_magnitude_mask(variance, count)


def task_vector_weights(deltas: Sequence[torch.Tensor]) -> list[float]:
    """s_i = mean(δ_i²) / Σ_j mean(δ_j²), or 1/n each when that sum is below 1e-6."""
    energies = [float(torch.sum(delta * delta, dtype=torch.float64)) for delta in deltas]
    return weights_of(energies, deltas[0].numel())


def weights_of(energies: Sequence[float], numel: int) -> list[float]:
    """The weights from each task vector's Σ δ² over its `numel` entries."""
    means = [energy / max(numel, 1) for energy in energies]
    total = sum(means)
    if abs(total) < WEIGHT_FLOOR:
        return [1.0 / len(means)] * len(means)
    return [mean / total for mean in means]


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: SceParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """base + Σ_i s_i m_i δ̃_i / max(Σ_i s_i m_i, 1e-6), δ̃_i the selected entries, m_i sign agreement."""
    assert base is not None
    dtype = torch.promote_types(base.dtype, torch.float32)
    deltas = [tensor.to(dtype) - base for tensor in tensors]
    if base.device.type == "cpu" and not any(nonfinite_count(delta) for delta in deltas):
        return _merge_in_chunks(deltas, base, method_params.select_topk)
    return _merge_whole(deltas, base, method_params.select_topk)


def _merge_whole(deltas: list[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    """`merge`'s steps on whole tensors (other devices, NaN/Inf): full-size masks, sums and divisor."""
    dtype = deltas[0].dtype
    if select_topk < 1.0:
        selected = selection_mask(deltas, select_topk)
        for delta in deltas:
            delta.mul_(selected)
        del selected
    weights = task_vector_weights(deltas)
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    positive = total >= 0
    del total
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = torch.where(positive, delta > 0, delta < 0).to(dtype)
        mixed.add_(delta * agrees, alpha=weight)
        divisor.add_(agrees, alpha=weight)
    return mixed.div_(divisor.clamp_(min=WEIGHT_FLOOR)).add_(base)


def _merge_in_chunks(deltas: list[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    """`merge`'s steps a chunk at a time (CPU, finite task vectors); the result is built in deltas[0]'s memory."""
    flats = [delta.reshape(-1) for delta in deltas]
    numel = flats[0].numel()
    if select_topk < 1.0:
        variance = torch.empty(numel, dtype=flats[0].dtype)
        for start in range(0, numel, MERGE_CHUNK):
            entry_variance([flat[start : start + MERGE_CHUNK] for flat in flats], variance[start : start + MERGE_CHUNK])
        cut = top_count_cut(variance, keep_count(select_topk, int(torch.count_nonzero(variance))))
        for start in range(0, numel, MERGE_CHUNK):
            selected = cut_keeps(variance[start : start + MERGE_CHUNK], cut, start)
            for flat in flats:
                flat[start : start + MERGE_CHUNK].mul_(selected)
        del variance
    _elect_and_sum(flats, task_vector_weights(deltas), base.reshape(-1))
    return deltas[0]


def _elect_and_sum(flats: list[torch.Tensor], weights: Sequence[float], flat_base: torch.Tensor) -> None:
    """Sign election and the weighted sum of flat selected task vectors, a chunk at a time, into flats[0]."""
    for start in range(0, flat_base.numel(), MERGE_CHUNK):
        chunks = [flat[start : start + MERGE_CHUNK] for flat in flats]
        total = chunks[0].clone()
        for chunk in chunks[1:]:
            total += chunk
        positive = total >= 0
        mixed = torch.zeros_like(chunks[0])
        divisor = torch.zeros_like(chunks[0])
        for chunk, weight in zip(chunks, weights, strict=True):
            agrees = torch.where(positive, chunk > 0, chunk < 0).to(chunk.dtype)
            mixed.add_(chunk * agrees, alpha=weight)
            divisor.add_(agrees, alpha=weight)
        torch.add(mixed.div_(divisor.clamp_(min=WEIGHT_FLOOR)), flat_base[start : start + MERGE_CHUNK], out=chunks[0])


@dataclass(frozen=True)
class SceStatistics:
    """What each row block needs: the selected entries, one bit each (None: all selected), and the weights s_i."""

    selected: np.ndarray | None  # np.packbits of the flat selection mask
    weights: list[float]


def _block_deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.promote_types(base.dtype, torch.float32)
    return [tensor.to(dtype).sub_(base).reshape(-1) for tensor in tensors]


def _select_block(deltas: list[torch.Tensor], selected: np.ndarray | None, first_entry: int) -> None:
    if selected is not None:
        keep = unpack_keep(selected, first_entry, deltas[0].numel())
        for delta in deltas:
            delta.mul_(keep)


def statistics(
    source: BlockSource,
    model_params: Sequence[Params],
    method_params: SceParams,
    generator: torch.Generator | None = None,
) -> SceStatistics:
    """The variances of every entry (one float buffer, from the blocks), their cut kept as one bit per entry, then
    the weights' sums of δ² by block (float64: the weights may differ from the whole tensor's in their last bits)."""
    selected = None
    if method_params.select_topk < 1.0:
        variance: torch.Tensor | None = None
        for first, base, tensors in source.blocks():
            deltas = _block_deltas(tensors, base)
            if variance is None:
                variance = torch.empty(source.numel, dtype=deltas[0].dtype)
            entry_variance(deltas, variance[first : first + deltas[0].numel()])
        assert variance is not None
        cut = top_count_cut(variance, keep_count(method_params.select_topk, int(torch.count_nonzero(variance))))
        selected = np.empty((source.numel + 7) // 8, dtype=np.uint8)
        for start in range(0, source.numel, MERGE_CHUNK):  # MERGE_CHUNK is a multiple of 8: whole bytes
            keep = cut_keeps(variance[start : start + MERGE_CHUNK], cut, start)
            selected[start // 8 : (start + keep.numel() + 7) // 8] = np.packbits(keep.numpy())
        del variance
    energies: list[float] = []
    for first, base, tensors in source.blocks():
        deltas = _block_deltas(tensors, base)
        _select_block(deltas, selected, first)
        sums = [float(torch.sum(delta * delta, dtype=torch.float64)) for delta in deltas]
        energies = [a + b for a, b in zip(energies, sums, strict=True)] if energies else sums
    return SceStatistics(selected, weights_of(energies, source.numel))


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[Params],
    method_params: SceParams,
    stats: SceStatistics,
    first_entry: int,
) -> torch.Tensor:
    """One row block merged as `merge` merges the whole tensor: the same selection, election and sum."""
    deltas = _block_deltas(tensors, base)
    _select_block(deltas, stats.selected, first_entry)
    _elect_and_sum(deltas, stats.weights, base.reshape(-1))
    return deltas[0].reshape(base.shape)


register(
    MergeMethod(
        name="sce",
        merge=merge,
        model_params=NoParams,
        method_params=SceParams,
        uses_base=True,
        two_pass=TwoPass(statistics=statistics, merge_block=merge_block),
    )
)
