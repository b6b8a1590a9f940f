"""Parameter values: gradients interpolate over layers, filters pick by name, precedence is mergekit's."""

from __future__ import annotations

import pytest

from moemerge.config.merge_recipe import Conditional
from moemerge.plan.parameters import evaluate, layer_position, lookup


def test_layer_position_spans_zero_to_one():
    assert [layer_position(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert layer_position(0, 1) == 1.0


def test_gradient_is_piecewise_linear_between_evenly_spaced_knots():
    gradient = [0.0, 0.5, 0.3, 0.7, 1.0]  # knots at 0, .25, .5, .75, 1
    assert evaluate(gradient, "x", 0.0) == 0.0
    assert evaluate(gradient, "x", 1.0) == 1.0
    assert evaluate(gradient, "x", 1 / 3) == pytest.approx(0.5 + (0.3 - 0.5) * ((1 / 3 - 0.25) / 0.25))
    assert evaluate([0.2, 0.6], "x", 0.5) == pytest.approx(0.4)
    assert evaluate([0.7], "x", 0.9) == pytest.approx(0.7)


def test_first_matching_filter_wins_and_star_matches_all():
    value = [
        Conditional(filter="self_attn", value=0.1),
        Conditional(filter="mlp", value=[0.0, 1.0]),
        Conditional(filter="*", value=0.9),
    ]
    assert evaluate(value, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate(value, "model.layers.3.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate(value, "model.norm.weight", 0.0) == 0.9
    assert evaluate([Conditional(filter="mlp", value=1.0)], "model.norm.weight", 0.0) is None


def test_precedence_source_over_slice_over_global():
    source, slice_level, global_level = {"weight": 0.1}, {"weight": 0.2, "density": 0.3}, {"density": 0.4, "x": 1}
    levels = [source, slice_level, global_level]
    assert lookup("weight", levels, "t", 0.0) == 0.1
    assert lookup("density", levels, "t", 0.0) == 0.3
    assert lookup("x", levels, "t", 0.0) == 1
    assert lookup("missing", levels, "t", 0.0) is None


def test_a_filter_that_matches_nothing_falls_through_to_the_next_level():
    levels = [{"weight": [Conditional(filter="mlp", value=0.1)]}, {"weight": 0.7}]
    assert lookup("weight", levels, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.7
    assert lookup("weight", levels, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.1
