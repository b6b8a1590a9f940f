"""Merge methods: pure tensor math behind a registry keyed by the YAML `merge_method` name."""

from moemerge.methods.registry import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "get_method"]
