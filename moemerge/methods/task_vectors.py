"""Task-vector arithmetic shared by task arithmetic, TIES, DARE and breadcrumbs: sign election and the final sum.

Each method turns its inputs into weighted task vectors w_i·δ̃_i (δ_i = x_i − base, sparsified its own way);
this module elects the sign (TIES) and adds them back onto the base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pydantic import Field

from moemerge.finite import nonfinite_count
from moemerge.methods.registry import Params

NEGLIGIBLE_WEIGHT_SUM = 1e-8
# entries merged at once by `add_task_vectors_in_chunks`: the sign election's masks, factors and divisor stay in
# cache and in reused heap memory instead of a dozen full-size temporaries that each cost page faults
MERGE_CHUNK = 2**18


class TaskVectorParams(Params):
    """Method-level keys every task-vector method accepts (mergekit's names)."""

    lambda_: float = Field(1.0, alias="lambda")  # scales the merged task vector before it is added to the base
    rescale: bool = False  # scale each sparsified task vector back to its unpruned L1 norm
    int8_mask: bool = False  # mergekit's memory trick; accepted so recipes run unchanged, no effect on the math


def task_vector(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """δ = x − base: what fine-tuning changed, built in the input's own memory (methods own their inputs)."""
    return tensor.sub_(base)


def weigh(delta: torch.Tensor, weight: float) -> torch.Tensor:
    """w · δ in place; a weight of 1.0 skips the pass (x · 1.0 is x, bit for bit)."""
    return delta if weight == 1.0 else delta.mul_(weight)


def elected_positive(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: 1.0 where Σ_i w_i δ̃_i ≥ 0 (a zero total counts as +), else +0.0, in the deltas' dtype.

    A comparison written as 0/1 floats is measured ~4× faster on the CPU than one written as bools (and the bools
    would be converted again by every float op that takes them).
    """
    if len(weighted_deltas) == 1:
        return torch.ge(weighted_deltas[0], 0, out=torch.empty_like(weighted_deltas[0]))
    total = torch.add(weighted_deltas[0], weighted_deltas[1])
    for weighted in weighted_deltas[2:]:
        total += weighted
    return torch.ge(total, 0, out=total)  # the sum's memory holds the election


def add_task_vectors(
    base: torch.Tensor,
    weighted_deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_consensus: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """base + λ · Σ_i m_i w_i δ̃_i, divided by Σ_i m_i w_i when `normalize` (a zero divisor counts as 1).

    With `sign_consensus` m_i = [sign(w_i δ̃_i) = elected sign] per entry (zeros never agree); without it m_i = 1
    and the divisor is the scalar Σ_i w_i (|Σ w_i| < 1e-8 counts as 1, so float dust does not blow the sum up).
    Consumes `weighted_deltas`: the sum is built in their memory, so the merge needs no extra full-size copies.
    """
    if not sign_consensus:
        mixed = weighted_deltas[0]
        for weighted in weighted_deltas[1:]:
            mixed += weighted
        if normalize:
            divisor = sum(weights)
            mixed /= divisor if abs(divisor) >= NEGLIGIBLE_WEIGHT_SUM else 1.0
        return weigh(mixed, scale).add_(base)

    positive = elected_positive(weighted_deltas)
    # m_i: w_i δ̃_i has the elected sign (strictly: zeros never agree). Entries that disagree are zeroed in place.
    # With p = [elected +], a = [w_i δ̃_i > 0], b = [w_i δ̃_i < 0] as 0/1 floats, m_i = b + p·(a − b): exactly 1.0
    # or +0.0, the bits of the bool agreement converted to float, from float ops only (see elected_positive)
    above, below = torch.empty_like(positive), torch.empty_like(positive)
    divisor = torch.zeros_like(base) if normalize else None
    for weighted, weight in zip(weighted_deltas, weights, strict=True):
        torch.gt(weighted, 0, out=above)
        torch.lt(weighted, 0, out=below)
        agrees = above.sub_(below).mul_(positive).add_(below)
        weighted.mul_(agrees)
        if divisor is not None:
            divisor.add_(agrees, alpha=weight)
    del above, below, positive
    mixed = weighted_deltas[0]
    for weighted in weighted_deltas[1:]:
        mixed += weighted
    if divisor is not None:
        divisor += torch.eq(divisor, 0, out=torch.empty_like(divisor))  # a zero divisor counts as 1
        mixed /= divisor
    return weigh(mixed, scale).add_(base)


def merge_sparsified(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[Params],
    method_params: TaskVectorParams,
    sparsify: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    sign_consensus: bool,
) -> torch.Tensor:
    """base + λ Σ_i m_i w_i δ̃_i (/ Σ m_i w_i), δ̃_i = sparsify(i, δ_i): TIES, DARE, breadcrumbs, whole or by block.

    `model_params` carry each input's `weight`; `method_params` its `normalize` and `lambda`.
    """
    weighted_deltas = [
        weigh(sparsify(index, task_vector(tensor, base)), params.weight)
        for index, (tensor, params) in enumerate(zip(tensors, model_params, strict=True))
    ]
    return add_task_vectors(
        base,
        weighted_deltas,
        [params.weight for params in model_params],
        sign_consensus=sign_consensus,
        normalize=method_params.normalize,
        scale=method_params.lambda_,
    )


def add_task_vectors_in_chunks(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    prepare: Callable[[int, torch.Tensor, int], torch.Tensor],
    *,
    sign_consensus: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """`add_task_vectors` a chunk at a time, with the same bits: the result is built in `deltas[0]`'s memory.

    `prepare(i, chunk, first_entry)` turns a flat chunk of δ_i (entries from `first_entry` on) into w_i·δ̃_i in
    place: the sparsification (when it is a per-entry rule, as a TIES cut) and the weight.
    """
    flat_base = base.reshape(-1)
    flats = [delta.reshape(-1) for delta in deltas]
    for start in range(0, flat_base.numel(), MERGE_CHUNK):
        stop = start + MERGE_CHUNK
        weighted = [prepare(index, flat[start:stop], start) for index, flat in enumerate(flats)]
        add_task_vectors(
            flat_base[start:stop], weighted, weights, sign_consensus=sign_consensus, normalize=normalize, scale=scale
        )  # in place: into the chunk of deltas[0]
    return deltas[0]


def merge_by_cuts(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[Params],
    method_params: TaskVectorParams,
    *,
    prune: Callable[[torch.Tensor, Params, bool], torch.Tensor],
    cut_of: Callable[[torch.Tensor, Params], object],
    apply: Callable[[torch.Tensor, object, int], torch.Tensor],
    sign_consensus: bool,
) -> torch.Tensor:
    """The merge of a method whose sparsification is a per-entry cut of each task vector (TIES, breadcrumbs).

    On the CPU each task vector's cut is found first (`cut_of(δ_i, params_i)`), then the trims (`apply`), sign
    election and sum run a chunk at a time; rescaled trims, NaN/Inf and other devices take `prune(δ_i, params_i,
    rescale)` over the whole tensor. Both give the same bits.
    """
    deltas = [task_vector(tensor, base) for tensor in tensors]
    weights = [params.weight for params in model_params]
    combine = {"sign_consensus": sign_consensus, "normalize": method_params.normalize, "scale": method_params.lambda_}
    if method_params.rescale or base.device.type != "cpu" or any(nonfinite_count(delta) for delta in deltas):
        trimmed = [
            prune(delta, params, method_params.rescale).mul_(params.weight)
            for delta, params in zip(deltas, model_params, strict=True)
        ]
        return add_task_vectors(base, trimmed, weights, **combine)
    cuts = [cut_of(delta, params) for delta, params in zip(deltas, model_params, strict=True)]

    def prepare(index: int, chunk: torch.Tensor, first_entry: int) -> torch.Tensor:
        return weigh(apply(chunk, cuts[index], first_entry), weights[index])

    return add_task_vectors_in_chunks(base, deltas, weights, prepare, **combine)
