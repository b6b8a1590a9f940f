"""RAM (Reinforced Agent Merging, 2026): average task vectors only where several models changed an entry.

An entry of δ_i counts as changed when |δ_i| > `epsilon`. Where one model changed it, that change is kept
whole; where c > 1 did, their changes are averaged (divided by c); unchanged entries keep the base.
`ramplus_tl` (RAM+, tensor-local) also boosts each model's unique changes by λ_i = 1 + r · min(ρ_i, α),
ρ_i = (its changed entries shared with others) / (its unique changed entries), counted over the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from pydantic import Field

from moemerge.methods.registry import BlockSource, MergeMethod, NoParams, Params, TwoPass, register


class RamParams(Params):
    epsilon: float = Field(1e-5, ge=0.0)  # |δ| above this counts as a change


class RamPlusParams(RamParams):
    r: float = 0.1  # boost strength
    alpha: float = 0.2  # cap on the shared/unique ratio


CHUNK = 2**16  # entries merged at once on the CPU: every temporary is a reused buffer of this size


def _changes(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float):
    """The task vectors with unchanged entries zeroed, each one's changed-mask, and the per-entry change count."""
    dtype = torch.promote_types(base.dtype, torch.float32)
    deltas = [tensor.to(dtype) - base for tensor in tensors]
    changed = [delta.abs() > epsilon for delta in deltas]
    count = torch.zeros(base.shape, dtype=torch.int64, device=base.device)
    for mask in changed:
        count += mask
    for delta, mask in zip(deltas, changed, strict=True):
        delta.mul_(mask)
    return deltas, changed, count


def _merged(base: torch.Tensor, deltas, count: torch.Tensor, boosts: Sequence[float]) -> torch.Tensor:
    """base + Σ_i δ_i (λ_i [c = 1] + [c > 1] / c)."""
    unique = count == 1
    shared_share = torch.where(count > 1, 1.0 / count.clamp(min=1).to(deltas[0].dtype), 0.0)
    merged = torch.zeros_like(deltas[0])
    for delta, boost in zip(deltas, boosts, strict=True):
        merged += delta * unique * boost + delta * shared_share
    return merged.add_(base)


class _Scratch:
    """One chunk's buffers, allocated once per tensor and reused: the page faults of fresh full-size temporaries
    (half of RAM's CPU time when every step made one) are gone."""

    def __init__(self, models: int, base: torch.Tensor) -> None:
        dtype, size = torch.promote_types(base.dtype, torch.float32), min(CHUNK, base.numel())
        self.deltas = torch.empty(models, size, dtype=dtype)
        self.changed = torch.empty(models, size, dtype=torch.bool)
        self.count = torch.empty(size, dtype=torch.int64)
        self.magnitude = torch.empty(size, dtype=dtype)

    def changes(self, tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, start: int, stop: int):
        """`_changes` of the flat entries start:stop, in these buffers, with the same operations."""
        size = stop - start
        count = self.count[:size].zero_()
        deltas, changed = self.deltas[:, :size], self.changed[:, :size]
        for index, tensor in enumerate(tensors):
            delta = deltas[index]
            delta.copy_(tensor[start:stop]).sub_(base[start:stop])  # x widened, minus the base (widened): x − base
            torch.gt(torch.abs(delta, out=self.magnitude[:size]), epsilon, out=changed[index])
            count += changed[index]
        deltas.mul_(changed)
        return deltas, changed, count


def _flat_inputs(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [tensor.reshape(-1) for tensor in tensors], base.reshape(-1)


def _merged_in_chunks(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, boosts: Sequence[float]
) -> torch.Tensor:
    """`_merged(base, *_changes(...))` a chunk at a time, the same bits."""
    dtype = torch.promote_types(base.dtype, torch.float32)
    flats, flat_base = _flat_inputs(tensors, base)
    scratch = _Scratch(len(tensors), base)
    # the result goes where the first input was (a chunk is read before it is written), when the dtypes agree
    first = tensors[0]
    merged = first if first.dtype == dtype and first.is_contiguous() else torch.empty(base.shape, dtype=dtype)
    flat_merged = merged.reshape(-1)
    for start in range(0, flat_base.numel(), CHUNK):
        stop = min(start + CHUNK, flat_base.numel())
        deltas, _, count = scratch.changes(flats, flat_base, epsilon, start, stop)
        flat_merged[start:stop] = _merged(flat_base[start:stop], deltas, count, boosts)
    return merged


def _summed(parts: Iterable[tuple[list[int], list[int]]], models: int) -> tuple[list[int], list[int]]:
    """Each model's shared and unique counts added up over parts (chunks, blocks): integers, so the same as whole."""
    shared, unique = [0] * models, [0] * models
    for part_shared, part_unique in parts:
        shared = [a + b for a, b in zip(shared, part_shared, strict=True)]
        unique = [a + b for a, b in zip(unique, part_unique, strict=True)]
    return shared, unique


def _tensor_counts(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float) -> tuple[list[int], list[int]]:
    """Each model's changed entries shared with others and unique to it; a chunk at a time on the CPU."""
    if base.device.type != "cpu":
        _, changed, count = _changes(tensors, base, epsilon)
        return _counts(changed, count)
    flats, flat_base = _flat_inputs(tensors, base)
    scratch = _Scratch(len(tensors), base)
    chunks = (
        _counts(*scratch.changes(flats, flat_base, epsilon, start, min(start + CHUNK, flat_base.numel()))[1:])
        for start in range(0, flat_base.numel(), CHUNK)
    )
    return _summed(chunks, len(tensors))


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: RamParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """base + Σ_i δ_i [|δ_i| > ε] / max(c, 1), c = #models with |δ| > ε at the entry."""
    assert base is not None
    if base.device.type == "cpu":
        return _merged_in_chunks(tensors, base, method_params.epsilon, [1.0] * len(tensors))
    deltas, _, count = _changes(tensors, base, method_params.epsilon)
    return _merged(base, deltas, count, [1.0] * len(deltas))


def _boosts(shared: Sequence[int], unique: Sequence[int], method_params: RamPlusParams) -> list[float]:
    """λ_i = 1 + r · clamp(shared_i / max(unique_i, ε), 0, α)."""
    return [
        1.0 + method_params.r * min(max(s / max(u, method_params.epsilon), 0.0), method_params.alpha)
        for s, u in zip(shared, unique, strict=True)
    ]


def _counts(changed, count: torch.Tensor) -> tuple[list[int], list[int]]:
    shared = [int(torch.count_nonzero(mask & (count > 1))) for mask in changed]
    unique = [int(torch.count_nonzero(mask & (count == 1))) for mask in changed]
    return shared, unique


def merge_plus(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: RamPlusParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """base + Σ_i δ_i [|δ_i| > ε] (λ_i [c = 1] + [c > 1] / c), λ_i from the tensor's shared/unique counts."""
    assert base is not None
    if base.device.type == "cpu":
        boosts = _boosts(*_tensor_counts(tensors, base, method_params.epsilon), method_params)
        return _merged_in_chunks(tensors, base, method_params.epsilon, boosts)
    deltas, changed, count = _changes(tensors, base, method_params.epsilon)
    boosts = _boosts(*_counts(changed, count), method_params)
    return _merged(base, deltas, count, boosts)


def statistics_plus(
    source: BlockSource,
    model_params: Sequence[Params],
    method_params: RamPlusParams,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Each model's boost λ_i from shared/unique counts summed over row blocks."""
    blocks = (_tensor_counts(tensors, base, method_params.epsilon) for _, base, tensors in source.blocks())
    return _boosts(*_summed(blocks, len(model_params)), method_params)


def merge_block_plus(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[Params],
    method_params: RamPlusParams,
    boosts: list[float],
    first_entry: int,
) -> torch.Tensor:
    if base.device.type == "cpu":
        return _merged_in_chunks(tensors, base, method_params.epsilon, boosts)
    deltas, _, count = _changes(tensors, base, method_params.epsilon)
    return _merged(base, deltas, count, boosts)


register(
    MergeMethod(
        name="ram",
        merge=merge,
        model_params=NoParams,
        method_params=RamParams,
        uses_base=True,
        elementwise=True,
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        merge=merge_plus,
        model_params=NoParams,
        method_params=RamPlusParams,
        uses_base=True,
        two_pass=TwoPass(statistics=statistics_plus, merge_block=merge_block_plus),
    )
)
