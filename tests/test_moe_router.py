"""Router math on small tensors, checked against loops and formulas written out here."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from moemerge.errors import ConfigError
from moemerge.moe.router import (
    add_noise,
    last_real_positions,
    parallel_pairs,
    pool_prompts,
    prompt_direction,
    random_rows,
    warn_parallel,
)


def test_last_real_position_ignores_padding_on_either_side():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_real_positions(right).tolist() == [2, 4, 0]
    assert last_real_positions(left).tolist() == [4, 4, 4]


def test_pooling_matches_a_per_prompt_loop():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    last = pool_prompts(hidden, mask, "last")
    mean = pool_prompts(hidden, mask, "mean")
    for row in range(3):
        real = [t for t in range(5) if mask[row, t]]
        torch.testing.assert_close(last[row], hidden[row, real[-1]])
        torch.testing.assert_close(mean[row], hidden[row, real].mean(dim=0))


def test_prompt_direction_is_normalised_difference_per_layer():
    positive = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    negative = torch.tensor([[0.0, 4.0], [1.0, 0.0]])
    direction = prompt_direction(positive, negative, "experts[0]")
    torch.testing.assert_close(direction, torch.tensor([[0.6, -0.8], [0.0, 1.0]]))
    torch.testing.assert_close(prompt_direction(positive, None, "e")[1], torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_identical_positive_and_negative_prompts_are_an_error():
    same = torch.ones(2, 3)
    with pytest.raises(ConfigError, match="experts\\[1\\]: positive and negative prompts give the same direction"):
        prompt_direction(same, same, "experts[1]")


def test_random_rows_are_seeded_normal_and_uniform_rows_are_bounded():
    normal = random_rows(4, 8, 256, seed=3, uniform=False)
    assert normal.shape == (4, 8, 256)
    torch.testing.assert_close(normal, random_rows(4, 8, 256, seed=3, uniform=False), rtol=0, atol=0)
    assert not torch.equal(normal, random_rows(4, 8, 256, seed=4, uniform=False))
    assert abs(normal.mean().item()) < 0.05 and abs(normal.std().item() - 1.0) < 0.05
    uniform = random_rows(4, 8, 256, seed=3, uniform=True)
    bound = 1 / math.sqrt(256)
    assert uniform.abs().max() <= bound
    assert uniform.abs().max() > 0.95 * bound  # spans the interval, not a narrower one
    assert abs(uniform.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(-b, b) is b/sqrt(3)


def test_noise_touches_only_noisy_experts_with_the_given_std():
    rows = torch.zeros(16, 3, 512)
    noisy = add_noise(rows, [0.0, 0.5, 0.0], seed=1)
    assert torch.equal(noisy[:, 0], rows[:, 0]) and torch.equal(noisy[:, 2], rows[:, 2])
    assert abs(noisy[:, 1].std().item() - 0.5) < 0.02
    assert torch.equal(noisy, add_noise(rows, [0.0, 0.5, 0.0], seed=1))
    assert not torch.equal(noisy, add_noise(rows, [0.0, 0.5, 0.0], seed=2))


def test_nearly_parallel_rows_are_counted_and_warned(caplog):
    rows = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 0.0, 1.0]],  # experts 0 and 1 parallel here
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    assert parallel_pairs(rows) == {(0, 1): 1}
    with caplog.at_level(logging.WARNING, logger="moemerge"):
        warn_parallel(rows)
    assert "experts[0] and experts[1] have nearly parallel router rows" in caplog.text
    assert "1 of 2 layers" in caplog.text
