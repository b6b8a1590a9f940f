"""Model breadcrumbs (Davari & Belilovsky, 2023): drop each task vector's largest outliers and smallest entries.

`breadcrumbs` merges with the plain weighted sum, `breadcrumbs_ties` with TIES sign election.

Each task vector keeps a band of magnitudes: the top `outliers + kept` entries minus the top `outliers`. Both edges
are TIES-style cuts (threshold and last tie kept, lowest flat index first), so on the CPU the band is found by
bracketed selection and applied a chunk at a time, and large tensors merge in row blocks (two passes) with the same
bits; rescaled trims, NaN/Inf and other devices take `prune_outliers` over the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from pydantic import Field

from moemerge.methods.registry import BlockSource, MergeMethod, Params, TwoPass, register
from moemerge.methods.sparsify import (
    MagnitudeCut,
    cut_keeps,
    gathered_magnitudes,
    keep_count,
    l1_norm,
    prune_outliers,
    top_count_cut,
)
from moemerge.methods.task_vectors import TaskVectorParams, merge_by_cuts, merge_sparsified


class BreadcrumbsModelParams(Params):
    weight: float
    density: float = Field(1.0, ge=0.0, le=1.0)  # fraction of entries kept
    gamma: float = Field(0.01, ge=0.0, le=1.0)  # fraction of entries dropped from the top magnitudes


class BreadcrumbsParams(TaskVectorParams):
    normalize: bool = False


@dataclass(frozen=True)
class Band:
    """The magnitudes one task vector keeps: inside `upper` (the top outliers + kept) and outside `outliers`."""

    upper: MagnitudeCut | None  # None: density 1, nothing is dropped
    outliers: MagnitudeCut | None  # None: no outliers dropped
    factor: float = 1.0  # rescale of the survivors (two-pass merges with rescale)


def band_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(outliers + kept, outliers): `prune_outliers`' counts; the outliers shrink when density + gamma exceed 1."""
    kept = keep_count(density, numel)
    outliers = min(keep_count(gamma, numel), numel - kept)
    return outliers + kept, outliers


def band_of(magnitudes: torch.Tensor, density: float, gamma: float) -> Band:
    """The band of an in-memory CPU task vector (or of its gathered magnitudes), by bracketed selection."""
    if density >= 1.0:
        return Band(upper=None, outliers=None)
    upper, outliers = band_counts(magnitudes.numel(), density, gamma)
    return Band(top_count_cut(magnitudes, upper), top_count_cut(magnitudes, outliers) if outliers else None)


def apply_band(delta: torch.Tensor, band: Band, first_entry: int) -> torch.Tensor:
    """Zero, in place, the entries of a flat chunk or block of δ (entries from `first_entry` on) outside the band."""
    if band.upper is not None:
        flat = delta.reshape(-1)
        keep = cut_keeps(flat, band.upper, first_entry)
        if band.outliers is not None:
            keep &= ~cut_keeps(flat, band.outliers, first_entry)
        delta.mul_(keep.reshape(delta.shape))
    if band.factor != 1.0:
        delta.mul_(band.factor)
    return delta


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[BreadcrumbsModelParams],
    method_params: BreadcrumbsParams,
    generator: torch.Generator | None = None,
    *,
    sign_consensus: bool,
) -> torch.Tensor:
    """base + λ Σ_i m_i w_i δ̃_i (/ Σ m_i w_i) with δ̃_i = δ_i minus its top-gamma and bottom magnitudes."""
    assert base is not None
    return merge_by_cuts(
        tensors,
        base,
        model_params,
        method_params,
        prune=lambda delta, params, rescale: prune_outliers(delta, params.density, params.gamma, rescale),
        cut_of=lambda delta, params: band_of(delta, params.density, params.gamma),
        apply=apply_band,
        sign_consensus=sign_consensus,
    )


def statistics(
    source: BlockSource,
    model_params: Sequence[BreadcrumbsModelParams],
    method_params: BreadcrumbsParams,
    generator: torch.Generator | None = None,
) -> list[Band]:
    """Each task vector's band, from its magnitudes gathered into one buffer (one model at a time)."""
    return [_gathered_band(source, index, params, method_params.rescale) for index, params in enumerate(model_params)]


def _gathered_band(source: BlockSource, model: int, params: BreadcrumbsModelParams, rescale: bool) -> Band:
    if params.density >= 1.0:
        return Band(upper=None, outliers=None)
    magnitudes = gathered_magnitudes(source, model)
    before = l1_norm(magnitudes) if rescale else 0.0
    band = band_of(magnitudes, params.density, params.gamma)
    if not rescale:
        return band
    # the norms of the flat buffer in flat order: the same sums `prune_outliers` takes over the whole tensor
    kept = l1_norm(apply_band(magnitudes, band, 0))
    return Band(band.upper, band.outliers, factor=before / kept if kept > 0.0 else 1.0)


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[BreadcrumbsModelParams],
    method_params: BreadcrumbsParams,
    bands: Sequence[Band],
    first_entry: int,
    *,
    sign_consensus: bool,
) -> torch.Tensor:
    """One row block merged as `merge` merges the whole tensor: the same bands, sign election and sum."""
    return merge_sparsified(
        tensors,
        base,
        model_params,
        method_params,
        lambda index, delta: apply_band(delta, bands[index], first_entry),
        sign_consensus=sign_consensus,
    )


for name, sign_consensus in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
    register(
        MergeMethod(
            name=name,
            merge=partial(merge, sign_consensus=sign_consensus),
            model_params=BreadcrumbsModelParams,
            method_params=BreadcrumbsParams,
            uses_base=True,
            two_pass=TwoPass(statistics=statistics, merge_block=partial(merge_block, sign_consensus=sign_consensus)),
        )
    )
