"""Objectives with a known optimum for the moemerge-evolve tests (loaded by path, as a user's file would be)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

TENSOR = "model.layers.1.mlp.down_proj.weight"
TARGET_WEIGHTS = (0.3, 0.8)  # the task-arithmetic weights whose merge the objective rewards


def _tensor(folder: str) -> torch.Tensor:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors[TENSOR].float()


def distance_to_target(state_dict, config, recipe) -> float:
    """Relative squared distance of one merged tensor to base + 0.3·δ₁ + 0.8·δ₂ (zero at the optimum)."""
    base = _tensor(recipe["base_model"])
    target = base + sum(
        weight * (_tensor(entry["model"]) - base)
        for weight, entry in zip(TARGET_WEIGHTS, recipe["models"], strict=True)
    )
    merged = state_dict[TENSOR].float()
    return float(((merged - target).norm() / (target - base).norm()) ** 2)
