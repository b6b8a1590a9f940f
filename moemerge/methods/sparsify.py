"""Sparsification of task vectors: which entries of a delta survive before the deltas are combined.

TIES keeps the largest magnitudes (selection, not a sort), DARE keeps a random Bernoulli(density) subset and
rescales it, breadcrumbs drops both the largest outliers and the smallest magnitudes.
"""

from __future__ import annotations

import torch


def keep_count(density: float, numel: int) -> int:
    """How many entries a density keeps: int(density · numel), truncated as mergekit does."""
    return max(0, min(numel, int(density * numel)))


def top_magnitude_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k entries with the largest |value|, same shape as `values`.

    Selection instead of a full sort: `kth_largest` finds the k-th largest magnitude (the threshold); every entry
    above it is kept, and the remaining slots go to the entries equal to the threshold in order of their flat
    (row-major) index, lowest first. That tie rule makes the mask deterministic and the same on every device.
    """
    numel = values.numel()
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k >= numel:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    magnitude = values.detach().abs().reshape(-1)
    threshold = kth_largest(magnitude, k)
    keep = magnitude > threshold
    at_threshold = magnitude == threshold
    missing = k - int(keep.sum())
    if int(at_threshold.sum()) == missing:
        keep |= at_threshold  # no tie straddles the cut: every entry at the threshold fits
    else:
        tied_positions = torch.nonzero(at_threshold).reshape(-1)[:missing]  # nonzero lists positions ascending
        keep[tied_positions] = True
    return keep.reshape(values.shape)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-d tensor (1 ≤ k ≤ numel), by selection rather than a full sort.

    On the CPU `kthvalue` is a linear-time quickselect; on CUDA it runs one thread block per slice and is ~100×
    slower than the radix-select behind `topk`, so there the threshold comes from the smaller side's topk.
    """
    numel = values.numel()
    if values.device.type == "cpu":
        return torch.kthvalue(values, numel - k + 1).values  # k-th largest = (n − k + 1)-th smallest
    if k <= numel - k + 1:
        return torch.topk(values, k, sorted=False).values.min()
    return torch.topk(values, numel - k + 1, largest=False, sorted=False).values.max()


def rescale_l1(kept: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Scale the surviving entries in place so that ‖kept‖₁ = ‖δ‖₁; an all-zero survivor set stays zero."""
    norm_dtype = torch.promote_types(delta.dtype, torch.float32)
    kept_l1 = float(kept.abs().sum(dtype=norm_dtype))
    if kept_l1 > 0.0:
        kept.mul_(float(delta.abs().sum(dtype=norm_dtype)) / kept_l1)
    return kept


def prune_magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: keep the int(density · numel) largest-magnitude entries of `delta`, zero the rest."""
    if density >= 1.0:
        return delta
    kept = delta.masked_fill(~top_magnitude_mask(delta, keep_count(density, delta.numel())), 0)
    return rescale_l1(kept, delta) if rescale else kept


def prune_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: keep int(density · numel) entries after dropping the int(gamma · numel) largest magnitudes.

    When density + gamma exceed 1 the outliers shrink to fit (the kept count wins). Ties at either cut follow
    `top_magnitude_mask`'s rule (the lower flat index ranks as larger).
    """
    if density >= 1.0:
        return delta
    numel = delta.numel()
    kept = keep_count(density, numel)
    outliers = min(keep_count(gamma, numel), numel - kept)
    mask = top_magnitude_mask(delta, outliers + kept)
    if outliers:
        mask &= ~top_magnitude_mask(delta, outliers)
    kept = delta.masked_fill(~mask, 0)
    return rescale_l1(kept, delta) if rescale else kept


def random_keep_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) keep-mask, drawn on the generator's own device so one seed gives one mask everywhere."""
    draws = torch.rand(shape, generator=generator, device=generator.device)
    return draws < density


def drop_random(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`; with `rescale`, scale the survivors so ‖kept‖₁ = ‖δ‖₁."""
    if density >= 1.0:
        return delta
    kept = delta.masked_fill(~random_keep_mask(delta.shape, density, generator).to(delta.device), 0)
    return rescale_l1(kept, delta) if rescale else kept
