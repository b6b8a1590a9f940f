"""Run a planned dense merge: load each output tensor's inputs, apply the method, write the model folder."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from moemerge.architectures import layer_of
from moemerge.config.merge_recipe import MergeRecipe
from moemerge.executor import OutputTensor, checked_output, write_outputs
from moemerge.io.loader import LazyModel, ModelPool
from moemerge.io.model_folder import write_config, write_model_card
from moemerge.io.output_dir import staged_output
from moemerge.io.summary import format_table
from moemerge.methods.registry import BlockSource, Params
from moemerge.methods.rounding import round_once
from moemerge.plan.dense_plan import MergePlan, TensorInput, TensorMerge
from moemerge.sizes import format_bytes
from moemerge.vocab.output import write_generation_config, write_tokenizer
from moemerge.vocab.rows import align_rows

log = logging.getLogger(__name__)

BLOCK_ELEMENTS = 8 * 2**20  # elementwise methods merge tensors larger than this in blocks of rows (32 MiB float32)
# Two-pass methods re-read their inputs, which pays only where a float32 copy per input sets the peak: the
# embeddings and lm_head (65 M entries on the benchmark set; its 11.5 M-entry MLP matrices stay whole: TIES
# 35.0 s against 36.3 s and 6.2 GB read from the page cache against 11.9 GB when they took two passes too).
TWO_PASS_BLOCKS = 4


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
    executor: str = "local"  # local | ray: output shards as Ray tasks (moemerge.distributed.ray_shards)
    ray_address: str | None = None  # join this Ray cluster; None starts a local Ray
    allow_nonfinite: bool = False  # write NaN/Inf (or float16 overflow) with a warning instead of failing


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
    # on CUDA the full tensors live in GPU memory, not the host's: one read of each beats two passes
    two_pass_size = TWO_PASS_BLOCKS * BLOCK_ELEMENTS
    if rows is None and plan.method.two_pass and str(options.device) == "cpu" and _is_large(merge, two_pass_size):
        return merge_in_two_passes(plan, merge, pool, options)
    base = read_input(plan, pool, options, merge.base, rows) if merge.base else None
    tensors = [read_input(plan, pool, options, item, rows) for item in merge.inputs]
    if merge.vocab is not None:  # each input's rows in the output vocabulary's token order (base last)
        aligned = align_rows(merge.vocab, tensors + ([base] if base is not None else []))
        tensors, base = (aligned[:-1], aligned[-1]) if base is not None else (aligned, None)
    if merge.fit_vocab:
        filler = base if base is not None else tensors[0]
        rows = merge.spec.shape[0]
        tensors = [fit_rows(tensor, rows, filler) for tensor in tensors]
    generator = _generator(plan, merge, options)
    merged = plan.method.merge(tensors, base, merge.model_params, merge.method_params, generator)
    merged = round_once(merged, plan.math_dtype)  # rounded once to the math dtype
    return checked_output(merge.spec, merged, options.allow_nonfinite)  # cast, with an overflow told from a NaN


def read_input(
    plan: MergePlan, pool: ModelPool, options: RunOptions, item: TensorInput, rows: tuple[int, int] | None
) -> torch.Tensor:
    """One input tensor (or its rows [start, stop)) rounded to the math dtype, on the merge device, for the method.

    Half-precision values come upcast to float32 (exactly): methods accumulate in float32 and the result is
    rounded to the math dtype once, instead of at every step of the method.
    """
    tensor = pool.get(item.model).read(item.name, dtype=plan.math_dtype, device=options.device, rows=rows)
    if plan.method.widens_inputs:
        return tensor  # the method widens them itself, a chunk at a time
    return tensor.to(compute_dtype(plan.math_dtype))


def compute_dtype(math_dtype: torch.dtype) -> torch.dtype:
    """The dtype methods compute in: the math dtype, widened to at least float32."""
    return torch.promote_types(math_dtype, torch.float32)


def _generator(plan: MergePlan, merge: TensorMerge, options: RunOptions) -> torch.Generator | None:
    """The tensor's own seeded generator, for random methods (DARE).

    A CPU generator on every device: the same seed gives the same DARE masks with --device cpu or cuda.
    """
    if not plan.method.random:
        return None
    return torch.Generator().manual_seed(tensor_seed(options.random_seed, merge.spec.name))


class _RowBlocks(BlockSource):
    """One output tensor's inputs, read block by block in the math dtype on the merge device."""

    def __init__(self, plan: MergePlan, merge: TensorMerge, pool: ModelPool, options: RunOptions):
        self.plan, self.merge, self.pool, self.options = plan, merge, pool, options
        self.numel = torch.Size(merge.spec.shape).numel()
        self.row_numel = self.numel // merge.spec.shape[0]

    def blocks(self, models=None):
        chosen = [self.merge.inputs[i] for i in models] if models is not None else list(self.merge.inputs)
        for rows in _row_ranges(self.merge.spec.shape):
            read = partial(read_input, self.plan, self.pool, self.options, rows=rows)
            yield rows[0] * self.row_numel, read(self.merge.base) if self.merge.base else None, list(map(read, chosen))


def merge_in_two_passes(plan: MergePlan, merge: TensorMerge, pool: ModelPool, options: RunOptions) -> torch.Tensor:
    """A large tensor of a two-pass method: per-tensor statistics from the blocks, then each block merged.

    Peak memory is the method's statistics buffer plus a few blocks and the output, instead of a float32
    copy of every input and the method's full-size temporaries.
    """
    two_pass = plan.method.two_pass
    assert two_pass is not None
    source = _RowBlocks(plan, merge, pool, options)
    stats = two_pass.statistics(source, merge.model_params, merge.method_params, _generator(plan, merge, options))
    out = torch.empty(merge.spec.shape, dtype=merge.spec.dtype)
    for first_entry, base, tensors in source.blocks():
        block = two_pass.merge_block(tensors, base, merge.model_params, merge.method_params, stats, first_entry)
        first_row = first_entry // source.row_numel
        block = checked_output(merge.spec, round_once(block, plan.math_dtype), options.allow_nonfinite)
        out[first_row : first_row + block.shape[0]].copy_(block)
    return out


def _is_large(merge: TensorMerge, size: int | None = None) -> bool:
    """Worth merging in row blocks: a matrix (or more) above `size` entries whose inputs share its shape."""
    shape = merge.spec.shape
    limit = BLOCK_ELEMENTS if size is None else size
    return not merge.fit_vocab and merge.vocab is None and len(shape) >= 2 and torch.Size(shape).numel() > limit


def _row_ranges(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    rows_per_block = max(1, BLOCK_ELEMENTS // (torch.Size(shape).numel() // shape[0]))
    return [(start, min(start + rows_per_block, shape[0])) for start in range(0, shape[0], rows_per_block)]


def row_blocks(plan: MergePlan, merge: TensorMerge) -> list[tuple[int, int] | None]:
    """Row ranges to merge `merge` in: [None] (whole) unless an elementwise method meets a large tensor.

    Blocks of at most BLOCK_ELEMENTS keep the working memory of a 32000 × 4096 embedding at a few blocks'
    worth instead of several full float32 copies, and let the workers share one large tensor.
    """
    if not plan.method.elementwise or not _is_large(merge):
        return [None]
    return _row_ranges(merge.spec.shape)


def describe_plan(plan: MergePlan, *, per_tensor: bool = False) -> str:
    """The --dry-run plan: what is read, the parameters resolved per layer (per tensor with -v), sizes, memory."""

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
    saved = sorted({str(merge.spec.dtype).removeprefix("torch.") for merge in plan.merges})
    base = next((merge.base.model for merge in plan.merges if merge.base), None)
    lines = [
        f"method: {plan.method.name}" + (f", base model: {base}" if base else ""),
        f"models: {', '.join(plan.models)}",
        f"reference (config, tokenizer): {plan.reference}",
        *_vocabulary_lines(plan),
        f"output: {len(plan.merges)} tensors in {plan.layer_count} layers, {format_bytes(plan.output_bytes)} "
        f"({', '.join(saved)}); math in {str(plan.math_dtype).removeprefix('torch.')}",
        f"estimated peak memory for tensors: {format_bytes(peak)} per worker (largest block x {inputs_per_tensor + 2})",
        "",
    ]
    return "\n".join(lines + parameter_table(plan, per_tensor=per_tensor))


def _values(params: list[Params]) -> str:
    """`weight=0.5 density=0.3..0.7`: each parameter's value, or its range over the tensors of a row."""
    values: dict[str, list] = {}
    for param in params:
        for key, value in param.model_dump(by_alias=True).items():
            values.setdefault(key, []).append(value)
    parts = []
    for key, seen in values.items():
        distinct = list(dict.fromkeys(seen))
        if len(distinct) == 1:
            parts.append(f"{key}={_number(distinct[0])}")
        elif all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in distinct):
            parts.append(f"{key}={_number(min(distinct))}..{_number(max(distinct))}")
        else:
            parts.append(f"{key}={'/'.join(_number(value) for value in distinct)}")
    return " ".join(parts) or "-"


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def parameter_table(plan: MergePlan, *, per_tensor: bool = False) -> list[str]:
    """One row per layer (and one for the tensors outside the layers): size and each model's resolved parameters."""
    groups: dict[str, list[TensorMerge]] = {}
    for merge in plan.merges:
        layer = layer_of(merge.spec.name)
        key = merge.spec.name if per_tensor else ("-" if layer is None else str(layer))
        groups.setdefault(key, []).append(merge)
    models = list(dict.fromkeys(item.model for merge in plan.merges for item in merge.inputs))
    header = ["tensor" if per_tensor else "layer", "tensors", "size", *models, "method"]
    rows = [header]
    for key, merges in groups.items():
        row = [key, str(len(merges)), format_bytes(sum(merge.spec.nbytes for merge in merges))]
        for model in models:
            params = [
                params
                for merge in merges
                for item, params in zip(merge.inputs, merge.model_params, strict=True)
                if item.model == model
            ]
            row.append(_values(params) if params else "(not merged)")
        row.append(_values([merge.method_params for merge in merges]))
        rows.append(row)
    return format_table(rows)


def unchanged_input(plan: MergePlan, merge: TensorMerge, pool: ModelPool) -> tuple[LazyModel, str] | None:
    """The input a passthrough tensor is, bit for bit: no scale, no vocabulary mapping, the same dtype, and a math
    dtype that holds it exactly (bfloat16 through float32 and back keeps every bit); else None (computed)."""
    if plan.method.name != "passthrough" or len(merge.inputs) != 1 or merge.fit_vocab or merge.vocab is not None:
        return None
    if getattr(merge.model_params[0], "scale", None) is not None:
        return None
    model, name = pool.get(merge.inputs[0].model), merge.inputs[0].name
    stored = model.dtype(name)
    if stored != merge.spec.dtype or torch.promote_types(stored, plan.math_dtype) != plan.math_dtype:
        return None
    return model, name


def planned_outputs(plan: MergePlan, pool: ModelPool, options: RunOptions) -> list[OutputTensor]:
    """Every output tensor (or row block of one) of the plan, in plan order, with how to compute it."""
    return [
        OutputTensor(
            merge.spec,
            lambda merge=merge, rows=rows: merge_tensor(plan, merge, pool, options, rows),
            sources=tuple((pool.get(item.model), item.name) for item in (*merge.inputs, *filter(None, [merge.base]))),
            rows=rows,
            checked=True,  # merge_tensor screens the result before its cast, where an overflow is told from a NaN
            copy_of=unchanged_input(plan, merge, pool),
        )
        for merge in plan.merges
        for rows in row_blocks(plan, merge)
    ]


def _vocabulary_lines(plan: MergePlan) -> list[str]:
    vocabulary = plan.vocabulary
    if vocabulary is None:
        return []
    aligned = sum(merge.vocab is not None for merge in plan.merges)
    return [f"vocabulary: {len(vocabulary.vocab)} tokens in {vocabulary.size} rows; tensors mapped by token: {aligned}"]


@dataclass(frozen=True)
class DenseOutputs:
    """The plan and options from which any process rebuilds the output tensors (what a Ray task receives)."""

    plan: MergePlan
    options: RunOptions

    def __call__(self, pool: ModelPool) -> list[OutputTensor]:
        return planned_outputs(self.plan, pool, self.options)


def run_merge(
    plan: MergePlan,
    recipe: MergeRecipe,
    recipe_text: str,
    pool: ModelPool,
    out: Path,
    options: RunOptions,
    inputs: list[str] | None = None,
) -> Path:
    """Write the merged model folder at `out`, atomically.

    `inputs`: the models the model card names (default: the plan's); a multi-stage merge names its chain's own
    inputs, not the intermediate folders it read and removed.
    """
    with staged_output(out, options.overwrite) as folder:
        write_outputs(
            folder,
            DenseOutputs(plan, options),
            pool,
            max_shard_bytes=options.out_shard_size,
            executor=options.executor,
            ray_address=options.ray_address,
            progress=options.progress,
            description=f"{plan.method.name} merge",
            max_memory=options.max_memory,
            workers=options.workers,
            allow_nonfinite=options.allow_nonfinite,
        )
        reference_folder = pool.get(plan.reference).folder
        write_config(folder, plan.config, out_dtype=recipe.saved_dtype)
        write_generation_config(reference_folder, folder, plan.vocabulary)
        write_tokenizer(
            folder,
            vocabulary=plan.vocabulary,
            tokenizer_folder=plan.tokenizer_folder,
            chat_template=recipe.chat_template,
            input_folders=[pool.get(model).folder for model in plan.models],
            copy=options.copy_tokenizer,
        )
        (folder / "moemerge_config.yml").write_text(recipe_text)
        inputs = plan.models if inputs is None else inputs
        base = f" with {recipe.base_model} as the base" if recipe.base_model in inputs else ""
        write_model_card(
            folder,
            title="Merged model",
            base_models=inputs,
            summary=f"This model is a merge of {len(inputs)} models using the `{plan.method.name}` method{base}.",
            recipe_text=recipe_text if recipe_text.endswith("\n") else recipe_text + "\n",
        )
    return Path(out)
