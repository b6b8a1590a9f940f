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


def merge_in_memory(recipe: dict, *, random_seed: int = 0) -> MergedModel:
    """Plan and run a dense recipe (a plain dict) tensor by tensor into memory, as `moemerge-yaml` would write it."""
    from moemerge.config.merge_recipe import parse_merge_recipe
    from moemerge.dense_merge import RunOptions, merge_tensor
    from moemerge.io.loader import ModelPool
    from moemerge.plan.dense_plan import plan_merge

    parsed = parse_merge_recipe(recipe, "recipe")
    pool = ModelPool()
    plan = plan_merge(parsed, pool)
    options = RunOptions(random_seed=random_seed, progress=False)
    state = {merge.spec.name: merge_tensor(plan, merge, pool, options) for merge in plan.merges}
    config = dict(plan.config)
    if parsed.saved_dtype is not None:
        state = {name: tensor.to(parsed.saved_dtype) for name, tensor in state.items()}
    return MergedModel(state, config, plan.tokenizer_folder)
