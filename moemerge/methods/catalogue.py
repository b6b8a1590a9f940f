"""Imports every merge-method module so each registers itself; `get_method` imports this first."""

from moemerge.methods import (  # noqa: F401
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
