"""The Python API: the three jobs as functions, with the same options as the commands (which only call these).

Recipes may be a YAML file path, a dict, or the validated pydantic recipe. Nothing heavy is imported at module
level: `import moemerge` stays cheap, and recipe errors are reported before torch loads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moemerge.config.merge_recipe import MergeRecipe, load_merge_recipe, parse_merge_recipe
from moemerge.config.moe_recipe import MoeRecipe, load_moe_recipe, parse_moe_recipe
from moemerge.errors import ConfigError, MoemergeError
from moemerge.io.summary import WriteSummary, summarize
from moemerge.sizes import parse_memory, parse_shard_size

if TYPE_CHECKING:
    import torch

    from moemerge.plan.dense_plan import MergePlan

log = logging.getLogger("moemerge")

# ---- recipes ---------------------------------------------------------------------------------------------------


def load_recipe(recipe: str | os.PathLike | dict | MergeRecipe) -> tuple[MergeRecipe, str]:
    """A dense-merge recipe and the YAML text stored beside the output, from a path, a dict or a MergeRecipe."""
    if isinstance(recipe, MergeRecipe):
        return recipe, yaml.safe_dump(recipe.model_dump(exclude_defaults=True, mode="json"), sort_keys=False)
    if isinstance(recipe, dict):
        return parse_merge_recipe(recipe, "recipe"), yaml.safe_dump(recipe, sort_keys=False)
    return load_merge_recipe(Path(recipe))


def load_moe(recipe: str | os.PathLike | dict | MoeRecipe) -> tuple[MoeRecipe, dict]:
    """A mergekit-moe recipe and its mapping (copied into the output), from a path, a dict or a MoeRecipe."""
    if isinstance(recipe, MoeRecipe):
        return recipe, recipe.model_dump(exclude_defaults=True, mode="json")
    if isinstance(recipe, dict):
        return parse_moe_recipe(recipe), recipe
    return load_moe_recipe(Path(recipe))


# ---- shared option handling ------------------------------------------------------------------------------------


def resolve_device(choice: str) -> str:
    """'auto' → cuda when available; asking for cuda without it is a user error, not a silent fallback."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise MoemergeError("--device cuda was given but no CUDA device is available (use --device cpu or auto)")
    return choice


def _sizes(out_shard_size: str | int, max_memory: str | int | None) -> tuple[int, int | None]:
    try:
        return parse_shard_size(out_shard_size), parse_memory(max_memory)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class WriteOptions:
    """The options of every job that writes a model folder (merge, build_moe, split), as the commands share them.

    Sizes are checked when the options are made, before anything heavy loads.
    """

    device: str = "cpu"  # cpu | cuda | auto
    out_shard_size: str | int = "5B"  # as mergekit reads it: 5B = five billion bytes; also 500M, 5GB, 2GiB
    max_memory: str | int | None = None  # with a unit (4G); None: a quarter of RAM, 1 GB to 16 GB
    workers: int | None = None  # tensors computed at once (default: one per core)
    overwrite: bool = False
    allow_nonfinite: bool = False  # write NaN/Inf (or float16 overflow) with a warning instead of failing
    progress: bool = True

    def __post_init__(self) -> None:
        _sizes(self.out_shard_size, self.max_memory)

    def resolved(self, shard_field: str = "max_shard_bytes") -> dict:
        """The fields as a job's own options take them: the device resolved, sizes in bytes."""
        shard_bytes, memory = _sizes(self.out_shard_size, self.max_memory)
        return {
            "device": resolve_device(self.device),
            shard_field: shard_bytes,
            "max_memory": memory,
            "workers": self.workers,
            "overwrite": self.overwrite,
            "allow_nonfinite": self.allow_nonfinite,
            "progress": self.progress,
        }


class _Stopwatch:
    """Seconds per stage, logged as each ends (shown with -v)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        self.stages[name] = time.perf_counter() - began
        log.debug("%s: %.2f s", name, self.stages[name])

    def summary(self, out: Path) -> WriteSummary:
        summary = summarize(out, time.perf_counter() - self.start, self.stages)
        log.debug("timings: %s", ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.stages.items()))
        return summary


# ---- dense merges ----------------------------------------------------------------------------------------------


def plan_merge(recipe: str | os.PathLike | dict | MergeRecipe, *, allow_crimes: bool = False) -> MergePlan:
    """Every output tensor of a dense merge with its inputs and resolved parameters: plain, picklable data."""
    from moemerge.io.loader import ModelPool
    from moemerge.plan.dense_plan import plan_merge as plan_dense_merge

    parsed, _ = load_recipe(recipe)
    return plan_dense_merge(parsed, ModelPool(), allow_crimes=allow_crimes)


def merge(
    recipe: str | os.PathLike | dict | MergeRecipe,
    out: str | os.PathLike,
    *,
    random_seed: int = 0,
    copy_tokenizer: bool = True,
    allow_crimes: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    intermediate_dir: str | os.PathLike | None = None,
    keep_intermediates: bool = False,
    dry_run: bool = False,
    verbose_plan: bool = False,
    **write: Any,
) -> WriteSummary | str:
    """Merge the recipe's models into the folder `out` (what `moemerge-yaml` does); `write`: WriteOptions' fields.

    Returns what was written; with dry_run=True, the plan as text instead (nothing is read but headers).
    A YAML file of several `---` documents is a multi-stage recipe: its stages run in dependency order, the
    intermediates in `intermediate_dir` (default: a hidden folder beside `out`). executor="ray" writes each
    output shard as a Ray task (joining `ray_address`, else a local Ray). allow_crimes: merge models of
    different architectures.
    """
    stages, recipe_text = _stages(recipe)
    common = WriteOptions(**write)
    from moemerge.dense_merge import RunOptions, describe_plan, run_merge
    from moemerge.io.loader import ModelPool
    from moemerge.io.output_dir import check_target
    from moemerge.plan.dense_plan import plan_merge as plan_dense_merge

    clock = _Stopwatch()
    if not dry_run:
        check_target(Path(out), common.overwrite)
    options = RunOptions(
        random_seed=random_seed,
        copy_tokenizer=copy_tokenizer,
        executor=executor,
        ray_address=ray_address,
        **common.resolved("out_shard_size"),
    )
    intermediates = Path(intermediate_dir) if intermediate_dir is not None else None
    if len(stages) > 1:
        from moemerge.stages import describe_stages, run_stages

        if dry_run:
            return describe_stages(stages, Path(out), options, intermediates)
        with clock.stage(f"{len(stages)} stages"):
            run_stages(
                stages,
                recipe_text,
                Path(out),
                options,
                intermediate_dir=intermediates,
                keep_intermediates=keep_intermediates,
                allow_crimes=allow_crimes,
            )
        return clock.summary(Path(out))
    parsed = stages[0].recipe
    pool = ModelPool()
    with clock.stage("plan"):
        plan = plan_dense_merge(parsed, pool, allow_crimes=allow_crimes)
    if dry_run:
        return describe_plan(plan, per_tensor=verbose_plan)
    log.debug("plan:\n%s", describe_plan(plan, per_tensor=True))
    with clock.stage("merge and write"):
        run_merge(plan, parsed, recipe_text, pool, Path(out), options)
    return clock.summary(Path(out))


def _stages(recipe: str | os.PathLike | dict | MergeRecipe) -> tuple[list, str]:
    """The recipe as stages (one unless a YAML file holds several documents) and the text stored with the output."""
    from moemerge.config.stages import Stage, load_stages

    if isinstance(recipe, (dict, MergeRecipe)):
        parsed, text = load_recipe(recipe)
        return [Stage(None, yaml.safe_load(text), parsed, ())], text
    return load_stages(Path(recipe))


def iter_merged(
    recipe: str | os.PathLike | dict | MergeRecipe | MergePlan,
    *,
    names: Iterable[str] | None = None,
    device: str = "cpu",
    random_seed: int = 0,
    allow_crimes: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge tensor by tensor in memory, yielding (name, tensor) in plan order; nothing is written.

    Give a recipe, or a plan from `plan_merge` (possibly unpickled in another process); `names` limits the run
    to those output tensors. Each tensor is computed exactly as `merge` computes it for the file.
    """
    from moemerge.dense_merge import RunOptions, merge_tensor
    from moemerge.io.loader import ModelPool
    from moemerge.plan.dense_plan import MergePlan

    plan = recipe if isinstance(recipe, MergePlan) else plan_merge(recipe, allow_crimes=allow_crimes)
    wanted = set(names) if names is not None else None
    if wanted is not None:
        missing = wanted - {merge.spec.name for merge in plan.merges}
        if missing:
            raise MoemergeError(f"names: the plan has no output tensor {sorted(missing)[0]!r}")
    options = RunOptions(device=resolve_device(device), random_seed=random_seed, progress=False)
    pool = ModelPool()
    for tensor_merge in plan.merges:
        if wanted is None or tensor_merge.spec.name in wanted:
            yield tensor_merge.spec.name, merge_tensor(plan, tensor_merge, pool, options)


def merge_state_dict(
    recipe: str | os.PathLike | dict | MergeRecipe | MergePlan,
    *,
    names: Iterable[str] | None = None,
    device: str = "cpu",
    random_seed: int = 0,
    allow_crimes: bool = False,
) -> dict[str, torch.Tensor]:
    """The merged model's tensors as a dict (for a parameter search or a quick evaluation); nothing is written."""
    return dict(iter_merged(recipe, names=names, device=device, random_seed=random_seed, allow_crimes=allow_crimes))


# ---- MoE assembly ----------------------------------------------------------------------------------------------


def build_moe(
    recipe: str | os.PathLike | dict | MoeRecipe,
    out: str | os.PathLike,
    *,
    random_seed: int = 0,
    copy_tokenizer: bool = True,
    trust_remote_code: bool = False,
    hidden_pool: str = "last",
    router_input: str = "layer",
    fit_labels: str = "posterior",
    fit_window: int = 32,
    executor: str = "local",
    ray_address: str | None = None,
    dry_run: bool = False,
    verbose_plan: bool = False,
    **write: Any,
) -> WriteSummary | str:
    """Assemble a mixture of experts from dense models (what `moemerge-moe` does); dry_run returns the plan.

    `write`: WriteOptions' fields. executor="ray" writes each output shard as a Ray task (the routers are
    computed here first).
    """
    parsed, recipe_data = load_moe(recipe)
    common = WriteOptions(**write)
    from moemerge.moe.assemble import MoeOptions, assemble_moe, describe_recipe

    if dry_run:
        return describe_recipe(parsed, per_tensor=verbose_plan)
    clock = _Stopwatch()
    options = MoeOptions(
        random_seed=random_seed,
        copy_tokenizer=copy_tokenizer,
        trust_remote_code=trust_remote_code,
        hidden_pool=hidden_pool,
        router_input=router_input,
        fit_labels=fit_labels,
        fit_window=fit_window,
        executor=executor,
        ray_address=ray_address,
        **common.resolved(),
    )
    assemble_moe(parsed, recipe_data, Path(out), options, stage=clock.stage)
    return clock.summary(Path(out))


# ---- expert extraction -----------------------------------------------------------------------------------------


def split(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    expert: int | None = None,
    all_experts: bool = False,
    average: bool = False,
    select: str | None = None,
    prune_to: int | None = None,
    calibration: str | os.PathLike | None = None,
    usage: str | os.PathLike | None = None,
    score: str = "reap",
    report: str | os.PathLike | None = None,
    seq_len: int = 256,
    max_tokens: int = 65536,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    dry_run: bool = False,
    verbose_plan: bool = False,
    **write: Any,
) -> WriteSummary | str:
    """Take experts out of an MoE as dense models, or prune it (what `moemerge-split` does); dry_run returns the plan.

    Exactly one of expert, all_experts, average, select ("top-usage" or "concat:K") and prune_to; select and
    prune_to need `calibration` (a text file) or `usage` (the JSON a previous run's report wrote). `write`:
    WriteOptions' fields.
    """
    common = WriteOptions(**write)
    from moemerge.split.run import SplitOptions, split_model

    clock = _Stopwatch()
    options = SplitOptions(
        expert=expert,
        all_experts=all_experts,
        average=average,
        select=select,
        prune_to=prune_to,
        calibration=Path(calibration) if calibration is not None else None,
        usage=Path(usage) if usage is not None else None,
        score=score,
        report=Path(report) if report is not None else None,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        **common.resolved(),
    )
    result = split_model(str(model), Path(out), options, dry_run=dry_run, per_tensor=verbose_plan, stage=clock.stage)
    if isinstance(result, str):
        return result
    return clock.summary(Path(out))
