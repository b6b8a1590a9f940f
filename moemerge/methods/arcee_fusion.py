"""Arcee Fusion: take the other model's changes only where they matter, judged by size and by output shift.

Importance per entry is |x − base| times the KL divergence KL(softmax(x) ‖ softmax(base)) of its row (the
last dimension; +1e-8 on both distributions). Entries at or above median + 1.5 · IQR of the importances keep
the other model's value, the rest the base's. Quantiles are order statistics at ⌊q · (n − 1)⌋ as in mergekit
0.1.5, but always of the whole tensor: mergekit estimates them from 10⁶ random entries on larger tensors,
which makes its output vary from run to run there.

Memory: a row's divergence needs only that row, so it is computed a few rows at a time and kept (one number
per row); the importances then cost one buffer, from which the three quartiles are selected in place, and the
fusion runs a few rows at a time again. Large tensors take two passes over row blocks: the importances of every
block into that buffer, then each block fused with the whole tensor's cut and its rows' divergences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from moemerge.methods.registry import BlockSource, Params, TwoPass, base_and_other, register_against_base

PROBABILITY_FLOOR = 1e-8
QUARTILES = (0.25, 0.5, 0.75)
# entries of rows handled at once: the divergence's p, q, p/q and log and the fusion's importances and mask stay
# cache-sized and are reused by the allocator, instead of full-size temporaries (as `ROUND_CHUNK`)
ROW_CHUNK = 2**16


def _divergence(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(other, dim=-1).add_(PROBABILITY_FLOOR)
    q = torch.softmax(base, dim=-1).add_(PROBABILITY_FLOOR)
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def row_divergence(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Σ_row p log(p/q), p = softmax(x) + 1e-8, q = softmax(base) + 1e-8 along the last dimension (kept, size 1).

    Computed a chunk of rows at a time: each row's value does not depend on the others.
    """
    if other.dim() < 2 or other.numel() == 0:
        return _divergence(other, base)
    divergence = torch.empty(*other.shape[:-1], 1, dtype=other.dtype, device=other.device)
    for rows_other, rows_base, rows_divergence in _row_chunks(other, base, divergence):
        rows_divergence.copy_(_divergence(rows_other, rows_base))
    return divergence


def _row_chunks(*tensors: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Views of the same few rows (last dimension) of each tensor, ROW_CHUNK entries of the first at a time."""
    rows = [tensor.reshape(-1, tensor.shape[-1]) for tensor in tensors]
    rows_per_chunk = max(1, ROW_CHUNK // tensors[0].shape[-1])
    for start in range(0, rows[0].shape[0], rows_per_chunk):
        yield [tensor[start : start + rows_per_chunk] for tensor in rows]


def importance(other: torch.Tensor, base: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
    """|x − base| · the row's divergence."""
    return torch.sub(other, base).abs_().mul_(divergence)


def quartiles(values: torch.Tensor) -> list[float]:
    """The order statistics at ⌊q · (n − 1)⌋ (q computed in float32, as mergekit) for q = 1/4, 1/2, 3/4.

    Selected in place on the CPU (numpy's introselect, the three at once; NaN ranks above every number, as in
    `torch.kthvalue`): `values` is left reordered.
    """
    flat = values.reshape(-1).cpu()
    positions = (torch.tensor(QUARTILES, dtype=torch.float32) * (flat.numel() - 1)).long().tolist()
    if flat.dtype not in (torch.float16, torch.float32, torch.float64):
        return [float(torch.kthvalue(flat, position + 1).values) for position in positions]
    array = flat.numpy()
    array.partition(positions)
    return [float(array[position]) for position in positions]


def outlier_cut(scores: torch.Tensor) -> float:
    """median + 1.5 (Q3 − Q1) of the importances (which are left reordered)."""
    first, median, third = quartiles(scores)
    return median + 1.5 * (third - first)


def fuse(other: torch.Tensor, base: torch.Tensor, divergence: torch.Tensor, cut: float) -> torch.Tensor:
    """base + (x − base) · [importance ≥ cut], in x's memory, a chunk of rows at a time."""
    if other.dim() < 2 or other.numel() == 0 or not other.is_contiguous():
        fused = importance(other, base, divergence) >= cut
        return other.sub_(base).mul_(fused).add_(base)
    for rows_other, rows_base, rows_divergence in _row_chunks(other, base, divergence):
        fused = importance(rows_other, rows_base, rows_divergence) >= cut
        rows_other.sub_(rows_base).mul_(fused).add_(rows_base)
    return other


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: Params,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """base + (x − base) · [importance ≥ median + 1.5 (Q3 − Q1)]."""
    base, other = base_and_other(tensors, base)
    divergence = row_divergence(other, base)
    cut = outlier_cut(importance(other, base, divergence))
    return fuse(other, base, divergence, cut)


def statistics(
    source: BlockSource,
    model_params: Sequence[Params],
    method_params: Params,
    generator: torch.Generator | None = None,
) -> tuple[float, torch.Tensor]:
    """The whole tensor's cut, from every block's importances in one buffer, and each row's divergence."""
    scores = divergences = None
    for first_entry, base, tensors in source.blocks():
        base, other = base_and_other(tensors, base)
        columns = other.shape[-1]
        if scores is None or divergences is None:
            scores = torch.empty(source.numel, dtype=other.dtype)
            divergences = torch.empty(source.numel // columns, dtype=other.dtype)
        divergence = row_divergence(other, base)
        block_scores = scores[first_entry : first_entry + other.numel()].view(other.shape)
        torch.mul(torch.sub(other, base).abs_(), divergence, out=block_scores)
        first_row = first_entry // columns
        divergences[first_row : first_row + divergence.numel()] = divergence.reshape(-1)
    assert scores is not None and divergences is not None
    return outlier_cut(scores), divergences


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: Params,
    stats: tuple[float, torch.Tensor],
    first_entry: int,
) -> torch.Tensor:
    """One block fused with the whole tensor's cut and its own rows' divergences."""
    cut, divergences = stats
    base, other = base_and_other(tensors, base)
    columns = other.shape[-1]
    first_row = first_entry // columns
    divergence = divergences[first_row : first_row + other.numel() // columns].reshape(*other.shape[:-1], 1)
    return fuse(other, base, divergence, cut)


register_against_base("arcee_fusion", merge, two_pass=TwoPass(statistics=statistics, merge_block=merge_block))
