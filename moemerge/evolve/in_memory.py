"""A recipe merged into a state dict, without writing files: what each search candidate costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class MergedModel:
    state_dict: dict[str, torch.Tensor]
    config: dict  # the output config.json as a dict
    tokenizer_folder: Path


def merge_in_memory(recipe: dict, *, random_seed: int = 0, allow_crimes: bool = False) -> MergedModel:
    """A dense recipe (a plain dict) merged into memory through the Python API, as `moemerge-yaml` would write it."""
    from moemerge.api import merge_state_dict, plan_merge

    plan = plan_merge(recipe, allow_crimes=allow_crimes)
    state = merge_state_dict(plan, random_seed=random_seed)  # each tensor as the file would hold it
    return MergedModel(state, dict(plan.config), plan.tokenizer_folder)
