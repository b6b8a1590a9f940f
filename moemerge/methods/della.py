"""DELLA (Deep et al., 2024): drop task-vector entries at random, the smaller ones more often, then merge.

MAGPRUNE ranks each row of |δ| (along dim 1; a 1-d tensor is one row), gives rank r of n the keep probability
p = (density − ε) + 2ε · r/(n − 1), so the smallest entry keeps with density − ε and the largest with
density + ε, and drops each entry with a Bernoulli draw. As in mergekit 0.1.5, `rescale` restores each task
vector's L1 norm (the paper divides each survivor by its p instead). `della` then elects a sign as TIES does,
`della_linear` takes the weighted sum.

The draws come from the tensor's seeded CPU generator and the ranks from a stable sort on the CPU, so a seed
gives the same bits on every device and worker count; ties in |δ| rank by flat index (mergekit's unstable
argsort orders them arbitrarily).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from pydantic import Field, model_validator

from moemerge.methods.dare import merge_block  # the same masked, rescaled block merge as DARE's
from moemerge.methods.ranks import ascending_columns
from moemerge.methods.registry import BlockSource, MergeMethod, Params, TwoPass, register
from moemerge.methods.sparsify import RandomCut, l1_norm, pack_into, rescale_l1
from moemerge.methods.task_vectors import TaskVectorParams, merge_sparsified

# entries ranked at once (measured best of 2^15 … 2^20): a chunk's keys, orders and gathered draws stay in cache instead
# of full-size int64 and float64 buffers; chunks hold whole rows (one row may be larger)
RANK_ENTRIES = 2**16


class DellaModelParams(Params):
    weight: float
    density: float = Field(1.0, ge=0.0, le=1.0)  # mean keep probability
    epsilon: float = Field(0.15, ge=0.0)  # keep probabilities span [density − ε, density + ε] by magnitude rank

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaModelParams:
        if 0.0 < self.density < 1.0 and not (0.0 < self.density - self.epsilon and self.density + self.epsilon < 1.0):
            raise ValueError(
                f"epsilon {self.epsilon} with density {self.density}: density ± epsilon must lie inside (0, 1)"
            )
        return self


class DellaParams(TaskVectorParams):
    normalize: bool = True
    rescale: bool = True


class DellaLinearParams(TaskVectorParams):
    normalize: bool = False
    rescale: bool = True


def magprune_keep(magnitudes: torch.Tensor, draws: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """True where MAGPRUNE keeps an entry: draw < (density − ε) + 2ε · rank/(n − 1), ranks along dim 1.

    `magnitudes` (|δ|, at least 2-d, on the CPU) and `draws` (uniform, same shape) are whole rows. Ranks follow a
    stable sort (ties by index). In sorted order position j has rank j, so each row's draws are gathered into
    sorted order, compared with one vector of probabilities per width, and the verdicts scattered back.
    """
    if magnitudes.numel() == 0:
        return torch.empty(magnitudes.shape, dtype=torch.bool)
    ranked, ranked_draws = _ranked_last(magnitudes), _ranked_last(draws)
    width = ranked.shape[1]
    probability = keep_probabilities(width, density, epsilon)
    keep = torch.empty(ranked.shape, dtype=torch.bool)
    step = max(1, RANK_ENTRIES // width)
    for start in range(0, ranked.shape[0], step):
        columns = ascending_columns(ranked[start : start + step])
        kept_in_order = torch.lt(ranked_draws[start : start + step].gather(1, columns), probability)
        keep[start : start + step].scatter_(1, columns, kept_in_order)
    if magnitudes.dim() == 2:
        return keep
    moved = magnitudes.movedim(1, -1).shape
    return keep.reshape(moved).movedim(-1, 1).contiguous()


def keep_probabilities(width: int, density: float, epsilon: float) -> torch.Tensor:
    """p(r) = (density − ε) + 2ε · r/(n − 1) for r = 0 … n − 1 (float64; a lone entry has r/(n − 1) = 0)."""
    spread = (
        torch.arange(width).to(torch.float64).div_(width - 1) if width > 1 else torch.zeros(width, dtype=torch.float64)
    )
    return spread.mul_(2 * epsilon).add_(density - epsilon)


def _ranked_last(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as rows along its dim 1: [rows, n] (a 3-d [a, n, b] becomes [a · b, n], a copy)."""
    if tensor.dim() == 2:
        return tensor
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1])


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The view MAGPRUNE ranks: a 1-d tensor becomes one row."""
    return tensor.unsqueeze(0) if tensor.dim() < 2 else tensor


def _draws(numel: int, generator: torch.Generator) -> torch.Tensor:
    """The generator's next `numel` uniform draws (flat order): torch's CPU stream is the same however it is split,
    so drawing a chunk of rows at a time gives the whole tensor's draws without a full-size float32 buffer."""
    return torch.rand(numel, generator=generator, device=generator.device)


def _row_chunks(rows: torch.Tensor) -> range:
    """Starts of chunks of about RANK_ENTRIES entries (whole slices along dim 0), RANK_ENTRIES // slice apart."""
    return range(0, rows.shape[0], max(1, RANK_ENTRIES * rows.shape[0] // max(1, rows.numel())))


def magprune_drawn(
    magnitudes: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """`magprune_keep` with the generator's next numel draws, drawn a chunk of rows at a time (CPU magnitudes)."""
    keep = torch.empty(magnitudes.shape, dtype=torch.bool)
    chunks = _row_chunks(magnitudes)
    for start in chunks:
        rows = magnitudes[start : start + chunks.step]
        draws = _draws(rows.numel(), generator).reshape(rows.shape)
        keep[start : start + chunks.step] = magprune_keep(rows, draws, density, epsilon)
    return keep


def drop_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """MAGPRUNE, in place on δ, a chunk of rows at a time; `rescale` restores ‖δ‖₁."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    l1_before = l1_norm(delta) if rescale else 0.0
    rows = _as_rows(delta)
    chunks = _row_chunks(rows)
    for start in chunks:
        chunk = rows[start : start + chunks.step]
        keep = magprune_drawn(chunk.detach().abs().cpu(), density, epsilon, generator)
        chunk.mul_(keep.to(chunk.device))
    return rescale_l1(delta, l1_before) if rescale else delta


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[DellaModelParams],
    method_params: DellaParams | DellaLinearParams,
    generator: torch.Generator | None,
    *,
    sign_consensus: bool,
) -> torch.Tensor:
    """base + λ Σ_i m_i w_i δ̃_i (/ Σ m_i w_i), δ̃_i = δ_i · Bernoulli(p(rank |δ_i|)), L1-rescaled."""
    assert base is not None
    if generator is None:
        raise ValueError("DELLA needs a seeded generator: the caller must pass one for random methods")

    def drop(index: int, delta: torch.Tensor) -> torch.Tensor:
        params = model_params[index]
        return drop_magprune(delta, params.density, params.epsilon, method_params.rescale, generator)

    return merge_sparsified(tensors, base, model_params, method_params, drop, sign_consensus=sign_consensus)


def statistics(
    source: BlockSource,
    model_params: Sequence[DellaModelParams],
    method_params: DellaParams | DellaLinearParams,
    generator: torch.Generator | None,
) -> list[RandomCut]:
    """Each task vector's keep-mask and L1 factor, from the same draws as `merge` (a block holds whole rows).

    The masks are packed one bit per entry (DARE's packed cut): 8× less memory than bool masks of the tensor's size
    while the blocks are merged.
    """
    if generator is None:
        raise ValueError("DELLA needs a seeded generator: the caller must pass one for random methods")
    cuts = []
    for index, params in enumerate(model_params):
        if params.density >= 1.0:
            cuts.append(RandomCut(keep=None))
            continue
        if params.density <= 0.0:
            cuts.append(RandomCut(keep=torch.zeros(source.numel, dtype=torch.bool)))
            continue
        packed = np.zeros((source.numel + 7) // 8, dtype=np.uint8)
        pending = torch.empty(0, dtype=torch.bool)  # a block's last entries short of a whole byte
        l1_before = l1_kept = 0.0
        drawn = 0
        for first, base, (tensor,) in source.blocks([index]):
            magnitudes = tensor.sub_(base).abs_()
            count = magnitudes.numel()
            assert first == drawn, "row blocks come in order and cover the tensor"
            drawn += count  # each block's draws as it comes (see `_draws`)
            block_keep = magprune_drawn(magnitudes.cpu(), params.density, params.epsilon, generator)
            bits = torch.cat([pending, block_keep.reshape(-1)])  # starts on a whole byte
            whole = bits.numel() // 8 * 8
            pack_into(packed, first - pending.numel(), bits[:whole])
            pending = bits[whole:]
            if method_params.rescale:
                l1_before += l1_norm(magnitudes)
                l1_kept += l1_norm(magnitudes.mul_(block_keep.to(magnitudes.device)))
        pack_into(packed, source.numel - pending.numel(), pending)
        factor = l1_before / l1_kept if method_params.rescale and l1_kept > 0.0 else 1.0
        cuts.append(RandomCut(keep=None, factor=factor, packed_keep=packed))
    return cuts


for name, params, sign_consensus in (("della", DellaParams, True), ("della_linear", DellaLinearParams, False)):
    register(
        MergeMethod(
            name=name,
            merge=partial(merge, sign_consensus=sign_consensus),
            model_params=DellaModelParams,
            method_params=params,
            uses_base=True,
            random=True,
            two_pass=TwoPass(statistics=statistics, merge_block=partial(merge_block, sign_consensus=sign_consensus)),
        )
    )
