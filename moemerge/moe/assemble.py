"""Wire MoE assembly together: recipe → sources → plan → gates → streamed tensors + config, tokenizer, card."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moemerge.architectures import layer_of
from moemerge.config.moe_recipe import MOE_DTYPES, MoeRecipe
from moemerge.dense_merge import tensor_seed
from moemerge.executor import OutputTensor, write_outputs
from moemerge.io.loader import LazyModel, ModelPool
from moemerge.io.model_folder import write_config, write_model_card, write_recipe
from moemerge.io.output_dir import check_target, staged_output
from moemerge.io.summary import Stage, format_table, no_stage
from moemerge.io.writer import TensorSpec
from moemerge.moe.config import moe_config
from moemerge.moe.fitted import calibration_text, fit_routers
from moemerge.moe.gates import Gates, compute_gates
from moemerge.moe.plan import Origin, PlannedTensor, plan_moe
from moemerge.moe.sources import MoeSources, resolve_sources
from moemerge.sizes import format_bytes
from moemerge.vocab.alignment import OutputVocabulary
from moemerge.vocab.build import build_vocabulary, embedding_rows, output_vocab_config
from moemerge.vocab.output import write_generation_config, write_tokenizer
from moemerge.vocab.rows import align_rows

log = logging.getLogger(__name__)

RECIPE_FILE = "moemerge_moe_config.yml"


@dataclass(frozen=True)
class MoeOptions:
    device: str = "cpu"
    random_seed: int = 0
    max_shard_bytes: int = 5 * 10**9
    copy_tokenizer: bool = True
    trust_remote_code: bool = False
    overwrite: bool = False
    hidden_pool: str = "last"
    progress: bool = True
    max_memory: int | None = None  # executor budget for tensors in flight (None: its default)
    workers: int | None = None
    allow_nonfinite: bool = False  # write NaN/Inf (or float16 overflow) with a warning instead of failing
    executor: str = "local"  # local | ray: output shards as Ray tasks (moemerge.distributed.ray_shards)
    ray_address: str | None = None  # join this Ray cluster; None starts a local Ray
    router_input: str = "layer"  # gate_mode hidden: the state entering the layer (mergekit) or its MLP ("mlp")
    fit_labels: str = "posterior"  # gate_mode fitted: soft labels from the experts' losses (measured best)
    fit_window: int = 32  # gate_mode fitted, posterior labels: tokens over which each expert's losses are summed


def output_dtype(recipe: MoeRecipe, sources: MoeSources) -> torch.dtype:
    """The recipe's dtype, else the base model's saved dtype, else float32."""
    if recipe.torch_dtype is not None:
        return recipe.torch_dtype
    saved = sources.base.config.get("dtype") or sources.base.config.get("torch_dtype")
    return getattr(torch, str(saved)) if str(saved) in MOE_DTYPES else torch.float32


def prepare(recipe: MoeRecipe, pool: ModelPool) -> tuple[MoeSources, list[PlannedTensor], OutputVocabulary | None]:
    """Everything that can fail on configs and headers alone, before any tensor is read."""
    sources = resolve_sources(recipe, pool)
    vocabulary = None
    if recipe.vocabulary_source is not None:
        models = list(
            dict.fromkeys([recipe.base_model, *(e.source_model for e in recipe.experts + recipe.shared_experts)])
        )
        spec = recipe.tokenizer
        vocabulary = build_vocabulary(
            recipe.vocabulary_source,
            models,
            recipe.base_model,
            pool,
            embedding_rows(pool, models, sources.base_arch),
            tokens=spec.tokens if spec else None,
            pad_to_multiple_of=spec.pad_to_multiple_of if spec else None,
        )
    return sources, plan_moe(sources, vocabulary), vocabulary


def describe(
    recipe: MoeRecipe,
    sources: MoeSources,
    planned: list[PlannedTensor],
    dtype: torch.dtype,
    *,
    per_tensor: bool = False,
) -> str:
    """The --dry-run plan: the MoE's shape, then per layer (per tensor with -v) what is copied from where."""
    itemsize = dtype.itemsize
    total = sum(torch.Size(t.shape).numel() for t in planned) * itemsize
    lines = [
        f"architecture: {sources.target.name} from {sources.base_arch.name} base {recipe.base_model}",
        f"experts: {len(sources.experts)} ({recipe.experts_per_token} per token), gate_mode: {recipe.gate_mode}, "
        f"layers: {sources.layers}, dtype: {str(dtype).removeprefix('torch.')}",
        f"shared experts: {', '.join(shared.entry.source_model for shared in sources.shared) or 'none'}",
        f"output: {len(planned)} tensors, {format_bytes(total)}",
        "",
    ]
    if per_tensor:
        return "\n".join(lines + [tensor.describe() for tensor in planned])
    groups: dict[str, list[PlannedTensor]] = {}
    for tensor in planned:
        layer = layer_of(tensor.name)
        groups.setdefault("-" if layer is None else str(layer), []).append(tensor)
    rows = [["layer", "tensors", "size", "from"]]
    for layer, tensors in groups.items():
        origins: dict[str, int] = {}
        for tensor in tensors:
            label = tensor.model.label if tensor.model is not None else tensor.origin.value
            origins[label] = origins.get(label, 0) + 1
        size = sum(torch.Size(t.shape).numel() for t in tensors) * itemsize
        rows.append(
            [layer, str(len(tensors)), format_bytes(size), ", ".join(f"{label} {n}" for label, n in origins.items())]
        )
    return "\n".join(lines + format_table(rows))


def describe_recipe(recipe: MoeRecipe, *, per_tensor: bool = False) -> str:
    """The dry-run text for a recipe: sources resolved and the plan made from configs and headers only."""
    sources, planned, _ = prepare(recipe, ModelPool())
    return describe(recipe, sources, planned, output_dtype(recipe, sources), per_tensor=per_tensor)


def noisy(tensor: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """tensor + std · N(0, 1), in float32, from a generator of its own (same seed and name, same noise)."""
    generator = torch.Generator().manual_seed(seed)
    return tensor.float() + std * torch.randn(tensor.shape, generator=generator)


def _joined(tensor: PlannedTensor, gates: Gates, random_seed: int) -> torch.Tensor:
    """Shared experts side by side along `concat_dim`, then zeros up to the planned width."""
    blocks = [_producer(part, gates, random_seed)().float() for part in tensor.parts]
    missing = tensor.shape[tensor.concat_dim] - sum(block.shape[tensor.concat_dim] for block in blocks)
    if missing:
        padding = list(tensor.shape)
        padding[tensor.concat_dim] = missing
        blocks.append(torch.zeros(padding))
    return torch.cat(blocks, dim=tensor.concat_dim)


def _producer(tensor: PlannedTensor, gates: Gates, random_seed: int = 0):
    if tensor.origin is Origin.CONCAT:
        return lambda: _joined(tensor, gates, random_seed)
    if tensor.origin is Origin.ZEROS:
        return lambda: torch.zeros(tensor.shape)
    if tensor.origin is Origin.ROUTER:
        return lambda: gates.router[tensor.layer]
    if tensor.origin is Origin.SHARED_GATE:
        assert gates.shared_gate is not None
        return lambda: gates.shared_gate[tensor.layer]
    if tensor.origin is Origin.VOCAB:
        assert tensor.vocab is not None
        return lambda: align_rows(
            tensor.vocab, [model.read(name, dtype=torch.float32) for model, name in tensor.vocab_inputs]
        )[0]
    assert tensor.model is not None and tensor.source_name is not None
    if tensor.noise_scale:
        seed = tensor_seed(random_seed, tensor.name)
        return lambda: noisy(tensor.model.read(tensor.source_name), tensor.noise_scale, seed) * tensor.scale
    if tensor.scale == 1.0:
        return lambda: tensor.model.read(tensor.source_name)
    return lambda: tensor.model.read(tensor.source_name, dtype=torch.float32) * tensor.scale


def _unchanged(tensor: PlannedTensor) -> tuple[LazyModel, str] | None:
    """The input a planned tensor copies as it is (no noise, no scale): a kernel-side copy when the dtype matches."""
    if tensor.origin is not Origin.COPY or tensor.scale != 1.0 or tensor.noise_scale:
        return None
    assert tensor.model is not None and tensor.source_name is not None
    return tensor.model, tensor.source_name


def output_tensors(
    planned: list[PlannedTensor], gates: Gates, dtype: torch.dtype, random_seed: int = 0
) -> list[OutputTensor]:
    """Each planned tensor with how to produce it (read an expert, add noise, scale it, or take a router row)."""
    return [
        OutputTensor(
            TensorSpec(t.name, t.shape, dtype),
            _producer(t, gates, random_seed),
            sources=t.vocab_inputs
            or tuple((part.model, part.source_name) for part in t.parts)
            or (((t.model, t.source_name),) if t.model and t.source_name else ()),
            copy_of=_unchanged(t),
        )
        for t in planned
    ]


@dataclass(frozen=True)
class MoeOutputs:
    """The recipe and the computed routers, from which any process rebuilds the output tensors (for Ray tasks)."""

    recipe: MoeRecipe
    gates: Gates
    dtype: torch.dtype
    random_seed: int = 0  # experts' noise_scale draws
    # the plan this process already made (its warnings already shown); not shipped: a Ray task plans again
    planned: list[PlannedTensor] | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "planned": None}

    def __call__(self, pool: ModelPool) -> list[OutputTensor]:
        planned = self.planned
        if planned is None:
            _, planned, _ = prepare(self.recipe, pool)  # configs and headers only: the same in every process
        return output_tensors(planned, self.gates, self.dtype, self.random_seed)


def assemble_moe(
    recipe: MoeRecipe, recipe_data: dict, out: Path, options: MoeOptions, *, stage: Stage = no_stage
) -> Path:
    """Build the MoE into `out` (atomically: nothing is left there on error); `stage` times plan, gates, write."""
    check_target(out, options.overwrite)
    with stage("plan"):
        pool = ModelPool()
        sources, planned, vocabulary = prepare(recipe, pool)
    dtype = output_dtype(recipe, sources)
    log.debug("plan:\n%s", describe(recipe, sources, planned, dtype, per_tensor=True))
    if recipe.gate_mode == "fitted":  # unreadable calibration files fail before any tensor is read
        for source in [*sources.experts, *sources.shared]:
            if source.entry.positive_prompts or source.entry.calibration_files:
                calibration_text(source.entry, source.label)
    with stage(f"gates ({recipe.gate_mode})"):
        gates = compute_gates(
            recipe,
            sources,
            device=options.device,
            seed=options.random_seed,
            pool=options.hidden_pool,
            trust_remote_code=options.trust_remote_code,
            max_memory=options.max_memory,
            router_input=options.router_input,
            progress=options.progress,
        )
    specs = [TensorSpec(t.name, t.shape, dtype) for t in planned]
    config = output_vocab_config(
        moe_config(sources, recipe.experts_per_token, recipe.norm_topk_prob), sources.base_arch, specs, vocabulary
    )
    with stage("write"), staged_output(out, options.overwrite) as folder:
        write_outputs(
            folder,
            MoeOutputs(recipe, gates, dtype, options.random_seed, planned=planned),
            pool,
            max_shard_bytes=options.max_shard_bytes,
            executor=options.executor,
            ray_address=options.ray_address,
            progress=options.progress,
            description="assembling",
            max_memory=options.max_memory,
            workers=options.workers,
            allow_nonfinite=options.allow_nonfinite,
        )
        write_config(folder, config, out_dtype=dtype)
        write_tokenizer(
            folder,
            vocabulary=vocabulary,
            tokenizer_folder=sources.base.folder,
            chat_template=recipe.chat_template,
            input_folders=[
                pool.get(m).folder
                for m in dict.fromkeys([recipe.base_model, *(e.source_model for e in recipe.experts)])
            ],
            copy=options.copy_tokenizer,
        )
        write_generation_config(sources.base.folder, folder, vocabulary)
        if recipe.gate_mode == "fitted":
            routers = {t.layer: t.name for t in planned if t.origin is Origin.ROUTER}
            # a gated shared expert (Qwen2-MoE, one shared expert with its own text) gets its gate fitted too
            shared = sources.shared[0] if sources.shared_gated and len(sources.shared) == 1 else None
            fit_routers(
                folder,
                routers,
                sources.base.folder,
                [(source.label, source.entry) for source in sources.experts],
                [source.model.folder for source in sources.experts],
                labels=options.fit_labels,
                window=options.fit_window,
                shared=(shared.label, shared.entry, shared.model.folder) if shared else None,
                shared_gate_names={t.layer: t.name for t in planned if t.origin is Origin.SHARED_GATE},
                device=options.device,
                max_memory=options.max_memory,
                progress=options.progress,
                seed=options.random_seed,
            )
        recipe_text = write_recipe(folder, RECIPE_FILE, recipe_data)
        write_model_card(
            folder,
            title=f"A {sources.target.name} mixture of {len(sources.experts)} experts",  # no folder name: reproducible
            base_models=[recipe.base_model, *(e.source_model for e in recipe.experts + recipe.shared_experts)],
            summary=(
                f"A {sources.target.name} model assembled with `moemerge-moe`: attention, norms and embeddings from "
                f"{recipe.base_model}; one expert per dense model below; router from gate_mode `{recipe.gate_mode}`, "
                f"{recipe.experts_per_token} experts per token."
            ),
            recipe_text=recipe_text,
            extra_tags=["moe", "frankenmoe"],
        )
    return Path(out)
