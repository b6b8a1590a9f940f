"""Run a planned dense merge: load each output tensor's inputs, apply the method, write the model folder."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.config.merge_recipe import MergeRecipe
from moemerge.executor import OutputTensor, write_tensors
from moemerge.io.loader import ModelPool
from moemerge.io.model_folder import copy_generation_config, copy_tokenizer, write_config, write_model_card
from moemerge.io.output_dir import staged_output
from moemerge.plan.dense_plan import MergePlan, TensorMerge

log = logging.getLogger(__name__)

BLOCK_ELEMENTS = 8 * 2**20  # elementwise methods merge tensors larger than this in blocks of rows (32 MiB float32)


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    random_seed: int = 0
    out_shard_size: int = 5 * 10**9
    copy_tokenizer: bool = True
    overwrite: bool = False
    progress: bool = True
    max_memory: int | None = None
    workers: int | None = None


def tensor_seed(random_seed: int, tensor_name: str) -> int:
    """A per-tensor seed: the same recipe and seed give the same masks in any order or thread."""
    return zlib.crc32(f"{random_seed}:{tensor_name}".encode())


def fit_rows(tensor: torch.Tensor, rows: int, filler: torch.Tensor) -> torch.Tensor:
    """Cut or extend a vocab-indexed tensor to `rows`, taking missing rows from `filler` (the base)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, filler[tensor.shape[0] : rows]])


def merge_tensor(
    plan: MergePlan, merge: TensorMerge, pool: ModelPool, options: RunOptions, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """The merged tensor, or only its rows [start, stop) for an elementwise method."""

    def read(model: str, name: str) -> torch.Tensor:
        return pool.get(model).read(name, dtype=plan.math_dtype, device=options.device, rows=rows)

    base = read(merge.base.model, merge.base.name) if merge.base else None
    tensors = [read(item.model, item.name) for item in merge.inputs]
    if merge.fit_vocab:
        filler = base if base is not None else tensors[0]
        rows = merge.spec.shape[0]
        tensors = [fit_rows(tensor, rows, filler) for tensor in tensors]
    generator = None
    if plan.method.random:
        # a CPU generator on every device: the same seed gives the same DARE masks with --device cpu or cuda
        generator = torch.Generator().manual_seed(tensor_seed(options.random_seed, merge.spec.name))
    merged = plan.method.merge(tensors, base, merge.model_params, merge.method_params, generator)
    return merged.to(merge.spec.dtype)


def row_blocks(plan: MergePlan, merge: TensorMerge) -> list[tuple[int, int] | None]:
    """Row ranges to merge `merge` in: [None] (whole) unless an elementwise method meets a large tensor.

    Blocks of at most BLOCK_ELEMENTS keep the working memory of a 32000 × 4096 embedding at a few blocks'
    worth instead of several full float32 copies, and let the workers share one large tensor.
    """
    shape = merge.spec.shape
    numel = torch.Size(shape).numel()
    if not plan.method.elementwise or merge.fit_vocab or len(shape) < 2 or numel <= BLOCK_ELEMENTS:
        return [None]
    rows_per_block = max(1, BLOCK_ELEMENTS // (numel // shape[0]))
    return [(start, min(start + rows_per_block, shape[0])) for start in range(0, shape[0], rows_per_block)]


def describe_plan(plan: MergePlan) -> str:
    """The --dry-run summary: what will be read, how, and how big the output and working set are."""

    def largest_unit(merge: TensorMerge) -> int:  # entries merged at once: the tensor, or its largest row block
        blocks = row_blocks(plan, merge)
        if blocks[0] is None:
            return torch.Size(merge.spec.shape).numel()
        return max(stop - start for start, stop in blocks) * (
            torch.Size(merge.spec.shape).numel() // merge.spec.shape[0]
        )

    largest = max((largest_unit(merge) for merge in plan.merges), default=0)
    inputs_per_tensor = max((len(merge.inputs) + (merge.base is not None) for merge in plan.merges), default=0)
    peak = largest * plan.math_dtype.itemsize * (inputs_per_tensor + 2)
    lines = [
        f"method: {plan.method.name}",
        f"models: {', '.join(plan.models)}",
        f"reference (config, tokenizer): {plan.reference}",
        f"output tensors: {len(plan.merges)} in {plan.layer_count} layers",
        f"output size: {plan.output_bytes / 1e9:.3f} GB",
        f"math dtype: {str(plan.math_dtype).removeprefix('torch.')}",
        f"estimated peak memory for tensors: {peak / 1e9:.3f} GB (largest block x {inputs_per_tensor + 2}, per worker)",
    ]
    return "\n".join(lines)


def run_merge(
    plan: MergePlan, recipe: MergeRecipe, recipe_text: str, pool: ModelPool, out: Path, options: RunOptions
) -> Path:
    """Write the merged model folder at `out`, atomically."""
    outputs = [
        OutputTensor(
            merge.spec,
            lambda merge=merge, rows=rows: merge_tensor(plan, merge, pool, options, rows),
            sources=tuple((pool.get(item.model), item.name) for item in (*merge.inputs, *filter(None, [merge.base]))),
            rows=rows,
        )
        for merge in plan.merges
        for rows in row_blocks(plan, merge)
    ]
    with staged_output(out, options.overwrite) as folder:
        write_tensors(
            folder,
            outputs,
            max_shard_bytes=options.out_shard_size,
            progress=options.progress,
            description=f"{plan.method.name} merge",
            max_memory=options.max_memory,
            workers=options.workers,
        )
        reference_folder = pool.get(plan.reference).folder
        write_config(folder, plan.config, out_dtype=recipe.saved_dtype)
        copy_generation_config(reference_folder, folder)
        if options.copy_tokenizer:
            copy_tokenizer(plan.tokenizer_folder, folder)
        (folder / "moemerge_config.yml").write_text(recipe_text)
        base = f" with {recipe.base_model} as the base" if recipe.base_model else ""
        write_model_card(
            folder,
            title="Merged model",
            base_models=plan.models,
            summary=f"This model is a merge of {len(plan.models)} models using the `{plan.method.name}` method{base}.",
            recipe_text=recipe_text if recipe_text.endswith("\n") else recipe_text + "\n",
        )
    return Path(out)
