"""Choose experts per layer from calibration statistics: the most used, the K most used, the K worth keeping."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from moemerge.errors import MoemergeError
from moemerge.split.usage import RouterUsage

Score = Literal["reap", "frequency"]
SELECT_PATTERN = re.compile(r"^(top-usage|concat:(\d+))$")


@dataclass(frozen=True)
class Selection:
    """`--select` parsed: top-usage (one expert per layer) or concat of the K most used experts."""

    kind: Literal["top-usage", "concat"]
    count: int = 1


def parse_select(text: str, num_experts: int) -> Selection:
    match = SELECT_PATTERN.match(text.strip())
    if not match:
        raise MoemergeError(f"--select {text!r}: use top-usage or concat:K (K a number of experts)")
    if match[2] is None:
        return Selection("top-usage")
    count = int(match[2])
    if not 1 <= count <= num_experts:
        raise MoemergeError(f"--select concat:{count}: K must be between 1 and the model's {num_experts} experts")
    return Selection("concat", count)


def most_used(usage: RouterUsage, layer: int, count: int) -> list[int]:
    """The `count` experts the router picked most often in a layer (ties: higher total routing weight, then index)."""
    return _best(usage.counts[layer], usage.weight_sums[layer], count)


def prune_scores(usage: RouterUsage, score: Score) -> torch.Tensor:
    """[layers, experts] scores to keep by: REAP (gate weight × ‖output‖ over routed tokens) or routing count."""
    return usage.reap if score == "reap" else usage.counts


def experts_to_keep(usage: RouterUsage, layer: int, count: int, score: Score) -> list[int]:
    """The `count` best experts of a layer by score, in their original order (so renumbering keeps their order)."""
    return sorted(_best(prune_scores(usage, score)[layer], usage.counts[layer], count))


def _best(primary: torch.Tensor, tie_break: torch.Tensor, count: int) -> list[int]:
    order = sorted(range(len(primary)), key=lambda e: (-float(primary[e]), -float(tie_break[e]), e))
    return order[:count]
