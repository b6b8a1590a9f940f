"""SCE (Wan et al., 2024): select the entries where the task vectors disagree most, weigh, erase, merge.

Select: with `select_topk` < 1, keep int(select_topk · n) entries of largest variance across the task vectors
(the population variance, as `torch.var` computes it: see `entry_variance`),
n counting the entries of non-zero variance (ties at the cut go to the lowest flat index; mergekit's topk
keeps an arbitrary subset). Calculate: each task vector weighs s_i = mean(δ_i²) / Σ_j mean(δ_j²), uniform when
that sum is below 1e-6 (mergekit 0.1.5's rule, which small task vectors meet). Erase: entries whose sign
differs from the sign of Σ_i δ_i (zeros never agree) are dropped.
Merge: base + Σ_i s_i m_i δ_i / max(Σ_i s_i m_i, 1e-6).

On the CPU the variance, the selection (a bracketed cut of the variances) and the sum run a cache-sized chunk at a
time with the same per-entry operations as the whole-tensor steps, in buffers reused from chunk to chunk, so the bits
are the same without fresh full-size temporaries (each costs page faults); the energies s_i keep their whole-tensor
float64 sums, over one float64 buffer that held the variances first. NaN/Inf and other devices take the whole-tensor
steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from moemerge.finite import nonfinite_count
from moemerge.methods.registry import BlockSource, MergeMethod, NoParams, Params, TwoPass, register
from moemerge.methods.scratch import ThreadBuffer
from moemerge.methods.sparsify import cut_keeps, keep_count, pack_into, top_count_cut, top_magnitude_mask, unpack_keep
from moemerge.methods.task_vectors import MERGE_CHUNK

WEIGHT_FLOOR = 1e-6
# entries whose float64 Welford steps run at once: the five float64 buffers (2.5 MB) stay in cache
VARIANCE_CHUNK = 2**16


class SceParams(Params):
    select_topk: float = Field(1.0, ge=0.0, le=1.0)  # fraction of the varying entries kept
    int8_mask: bool = False  # mergekit's memory trick; accepted so recipes run unchanged, no effect on the math


def entry_variance(deltas: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The population variance of each entry across the task vectors, into `out` (contiguous, like the deltas).

    Welford's steps in float64, entry by entry: the bits of `torch.var(torch.stack(deltas), dim=0, unbiased=False)`
    on the CPU (mergekit's way), measured 14× faster than that reduction over a stacked dimension, and elementwise,
    so chunks and whole tensors agree. They run VARIANCE_CHUNK entries at a time in five reused float64 buffers.
    """
    accumulate = torch.promote_types(out.dtype, torch.float64)
    flats = [delta.reshape(-1) for delta in deltas]
    flat_out = out.view(-1) if out.is_contiguous() else torch.empty(out.numel(), dtype=out.dtype, device=out.device)
    numel = flat_out.numel()
    size = max(1, min(VARIANCE_CHUNK, numel))
    buffers = [torch.empty(size, dtype=accumulate, device=out.device) for _ in range(5)]
    for start in range(0, numel, size):
        stop = min(start + size, numel)
        mean, squares, wide, step, share = (buffer[: stop - start] for buffer in buffers)
        mean.copy_(flats[0][start:stop])
        squares.zero_()
        for count, flat in enumerate(flats[1:], start=2):
            wide.copy_(flat[start:stop])  # never the caller's own (float64) tensor
            torch.sub(wide, mean, out=step)
            mean.add_(torch.div(step, count, out=share))
            squares.add_(step.mul_(wide.sub_(mean)))
        flat_out[start:stop].copy_(squares.div_(len(flats)))
    if flat_out.data_ptr() != out.data_ptr():
        out.copy_(flat_out.view(out.shape))
    return out


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


def float64_scratch(count: int, reuse: torch.Tensor | None = None) -> torch.Tensor:
    """`count` float64 entries: in the memory of `reuse` (a contiguous buffer the caller is done with) when it is large
    enough, else fresh."""
    if reuse is not None and reuse.is_contiguous() and reuse.numel() * reuse.element_size() >= 8 * count:
        return reuse.view(-1).view(torch.uint8)[: 8 * count].view(torch.float64)
    return torch.empty(count, dtype=torch.float64)


# per worker thread: one float64 buffer (at most 128 MiB) that the tensors it merges reuse
SCRATCH = ThreadBuffer(retained=2**24)


def sum_of_squares(flat: torch.Tensor, scratch: torch.Tensor) -> float:
    """Σ δ² of a flat task vector: the bits of `torch.sum(δ * δ, dtype=torch.float64)`, without its two full-size
    temporaries (δ² and its float64 copy): δ² is rounded in δ's dtype a chunk at a time into the float64 `scratch`
    (at least δ's size), which is then summed whole, in the same order."""
    numel = flat.numel()
    squares = scratch[:numel]
    if flat.dtype == torch.float64:
        return float(torch.sum(torch.mul(flat, flat, out=squares)))
    chunk_squares = torch.empty(min(MERGE_CHUNK, numel), dtype=flat.dtype)
    for start in range(0, numel, MERGE_CHUNK):
        chunk = flat[start : start + MERGE_CHUNK]
        squares[start : start + chunk.numel()].copy_(torch.mul(chunk, chunk, out=chunk_squares[: chunk.numel()]))
    return float(torch.sum(squares))


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
    # in the inputs' memory (the method owns them); contiguous, so that flat chunks are views of them
    deltas = [tensor.to(dtype).sub_(base).contiguous() for tensor in tensors]
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
    scratch = SCRATCH.get(numel)  # the variances (in its first half), then each Σ δ²'s squares
    if select_topk < 1.0:
        variance = scratch.view(torch.uint8)[: numel * flats[0].element_size()].view(flats[0].dtype)
        entry_variance(flats, variance)
        cut = top_count_cut(variance, keep_count(select_topk, int(torch.count_nonzero(variance))))
        for start in range(0, numel, MERGE_CHUNK):
            selected = cut_keeps(variance[start : start + MERGE_CHUNK], cut, start)
            for flat in flats:
                flat[start : start + MERGE_CHUNK].mul_(selected)
        del variance
    weights = weights_of([sum_of_squares(flat, scratch) for flat in flats], numel)
    del scratch
    _elect_and_sum(flats, weights, base.reshape(-1))
    return deltas[0]


def _elect_and_sum(
    flats: list[torch.Tensor],
    weights: Sequence[float],
    flat_base: torch.Tensor,
    selected: np.ndarray | None = None,
    first_entry: int = 0,
) -> None:
    """Sign election and the weighted sum of flat task vectors, a chunk at a time, into flats[0].

    `selected` (packed, entries from `first_entry` on) zeroes the unselected entries of each chunk first. The
    election is `_merge_whole`'s as 0/1 floats in reused buffers: p = [Σ δ ≥ 0], a = [δ > 0], b = [δ < 0] and
    m = b + p·(a − b), exactly 1.0 or +0.0 as the bool agreement converted (see `task_vectors.elected_positive`).
    """
    numel = flat_base.numel()
    size = max(1, min(MERGE_CHUNK, numel))
    buffers = [torch.empty(size, dtype=flats[0].dtype, device=flat_base.device) for _ in range(5)]
    for start in range(0, numel, size):
        stop = min(start + size, numel)
        chunks = [flat[start:stop] for flat in flats]
        positive, above, below, mixed, divisor = (buffer[: stop - start] for buffer in buffers)
        if selected is not None:
            keep = unpack_keep(selected, first_entry + start, stop - start)
            for chunk in chunks:
                chunk.mul_(keep)
        if len(chunks) == 1:
            positive.copy_(chunks[0])
        else:
            torch.add(chunks[0], chunks[1], out=positive)
        for chunk in chunks[2:]:
            positive += chunk
        torch.ge(positive, 0, out=positive)
        mixed.zero_()
        divisor.zero_()
        for chunk, weight in zip(chunks, weights, strict=True):
            torch.gt(chunk, 0, out=above)
            torch.lt(chunk, 0, out=below)
            agrees = above.sub_(below).mul_(positive).add_(below)
            mixed.add_(chunk.mul_(agrees), alpha=weight)
            divisor.add_(agrees, alpha=weight)
        torch.add(mixed.div_(divisor.clamp_(min=WEIGHT_FLOOR)), flat_base[start:stop], out=chunks[0])


@dataclass(frozen=True)
class SceStatistics:
    """What each row block needs: the selected entries, one bit each (None: all selected), and the weights s_i."""

    selected: np.ndarray | None  # np.packbits of the flat selection mask
    weights: list[float]


def _block_deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.promote_types(base.dtype, torch.float32)
    return [tensor.to(dtype).sub_(base).reshape(-1) for tensor in tensors]


def _select_block(deltas: list[torch.Tensor], selected: np.ndarray | None, first_entry: int) -> None:
    """Zero the unselected entries of a block's flat task vectors, a chunk of the packed mask at a time."""
    if selected is None:
        return
    for start in range(0, deltas[0].numel(), MERGE_CHUNK):
        keep = unpack_keep(selected, first_entry + start, deltas[0][start : start + MERGE_CHUNK].numel())
        for delta in deltas:
            delta[start : start + MERGE_CHUNK].mul_(keep)


def statistics(
    source: BlockSource,
    model_params: Sequence[Params],
    method_params: SceParams,
    generator: torch.Generator | None = None,
) -> SceStatistics:
    """The variances of every entry (one float buffer, from the blocks), their cut kept as one bit per entry, then
    the weights' sums of δ² by block (float64: the weights may differ from the whole tensor's in their last bits).

    The sums' float64 squares go into the variances' buffer once the cut is taken (a fresh block-sized buffer
    when there is none, or it is too small)."""
    SCRATCH.release()  # this thread's whole-tensor scratch: the variances take its place for a while
    selected = None
    variance: torch.Tensor | None = None
    if method_params.select_topk < 1.0:
        for first, base, tensors in source.blocks():
            deltas = _block_deltas(tensors, base)
            if variance is None:
                variance = torch.empty(source.numel, dtype=deltas[0].dtype)
            entry_variance(deltas, variance[first : first + deltas[0].numel()])
            del deltas
        assert variance is not None
        cut = top_count_cut(variance, keep_count(method_params.select_topk, int(torch.count_nonzero(variance))))
        selected = np.empty((source.numel + 7) // 8, dtype=np.uint8)
        for start in range(0, source.numel, MERGE_CHUNK):  # MERGE_CHUNK is a multiple of 8: whole bytes
            keep = cut_keeps(variance[start : start + MERGE_CHUNK], cut, start)
            pack_into(selected, start, keep)
    energies: list[float] = []
    scratch: torch.Tensor | None = None
    for first, base, tensors in source.blocks():
        deltas = _block_deltas(tensors, base)
        _select_block(deltas, selected, first)
        if scratch is None or scratch.numel() < deltas[0].numel():
            scratch = float64_scratch(deltas[0].numel(), variance)
            variance = None  # kept only as the scratch's memory, when it is
        sums = [sum_of_squares(delta, scratch) for delta in deltas]
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
    _elect_and_sum(deltas, stats.weights, base.reshape(-1), stats.selected, first_entry)
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
