"""Imports every merge-method module so each registers itself; `get_method` imports this first."""

from moemerge.methods import (  # noqa: F401
    breadcrumbs,
    dare,
    linear,
    passthrough,
    slerp,
    task_arithmetic,
    ties,
)
