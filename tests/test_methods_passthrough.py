"""Passthrough: the one source tensor, optionally scaled."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge

from moemerge.errors import ConfigError
from moemerge.methods import get_method

X = torch.tensor([[1.5, -2.0], [0.25, 4.0]])


def test_copies_unchanged_without_scale() -> None:
    assert torch.equal(run_merge("passthrough", [X], None, [{}]), X)


def test_scale_multiplies() -> None:
    assert torch.equal(
        run_merge("passthrough", [X], None, [{"scale": 0.5}]), torch.tensor([[0.75, -1.0], [0.125, 2.0]])
    )
    assert torch.equal(run_merge("passthrough", [X], None, [{"scale": 0}]), torch.zeros(2, 2))


def test_single_source_only() -> None:
    assert get_method("passthrough").single_source
    with pytest.raises(ConfigError, match="exactly one"):
        run_merge("passthrough", [X, X], None, [{}, {}])
