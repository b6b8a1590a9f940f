"""Which MoE architecture a recipe builds, and whether its dense models fit together (configs only, no tensors)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from moemerge.architectures import Architecture, layer_count, moe_outputs, require_architecture
from moemerge.config.moe_recipe import PROMPT_GATE_MODES, ExpertEntry, MoeRecipe
from moemerge.errors import ConfigError, MoemergeError
from moemerge.io.loader import LazyModel, ModelPool

log = logging.getLogger(__name__)

SIZE_KEYS = ("hidden_size", "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class ExpertSource:
    """One expert's dense model, opened lazily, with its recipe entry."""

    label: str  # recipe location, e.g. "experts[1]"
    entry: ExpertEntry
    model: LazyModel
    arch: Architecture


@dataclass(frozen=True)
class MoeSources:
    base: LazyModel
    base_arch: Architecture
    target: Architecture
    experts: list[ExpertSource]
    shared: tuple[ExpertSource, ...]  # concatenated into the family's one shared MLP
    layers: int
    hidden_size: int
    expert_intermediate: int
    shared_intermediate: int | None  # the shared MLP's width as written (zero rows pad it where the family counts)
    shared_gated: bool = False  # the shared gate varies with the token (prompts or noise); else sigmoid(0), compensated

    @property
    def shared_widths(self) -> tuple[int, ...]:
        return tuple(int(_text_config(source.model.config)["intermediate_size"]) for source in self.shared)


def infer_architecture(recipe: MoeRecipe, base_type: str) -> Architecture:
    """The MoE family a recipe builds: its `architecture` (a family name or a mergekit-moe value such as `qwen`),
    else the first output family in the table built from the base's model type, preferring one with a shared
    expert exactly when the recipe lists shared experts (mergekit-moe's rules, read from the table)."""
    outputs = moe_outputs()
    if recipe.architecture:
        named = [arch for arch in outputs if recipe.architecture == arch.name or recipe.architecture in _names(arch)]
        if not named:
            raise ConfigError(f"architecture {recipe.architecture!r} is not an MoE output moemerge can write")
        return next((arch for arch in named if base_type in _bases(arch)), named[0])
    wants_shared = bool(recipe.shared_experts)
    fitting = [arch for arch in outputs if base_type in _bases(arch)]
    same_kind = [arch for arch in fitting if (_shared(arch) is not None) == wants_shared]
    if same_kind:
        return same_kind[0]
    if wants_shared:  # the first output with a shared expert; a base it is not built from is refused with why
        return next(arch for arch in outputs if _shared(arch) is not None)
    return (fitting or list(outputs))[0]


def _names(arch: Architecture) -> tuple[str, ...]:
    return arch.moe.recipe_names if arch.moe else ()


def _bases(arch: Architecture) -> tuple[str, ...]:
    return arch.moe.dense_bases if arch.moe else ()


def _shared(arch: Architecture):
    return arch.moe.shared_expert if arch.moe else None


def _open(pool: ModelPool, reference: str, label: str) -> LazyModel:
    try:
        return pool.get(reference)
    except MoemergeError as error:
        raise type(error)(f"{label}: {error}") from None


def _text_config(config: dict) -> dict:
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) and "hidden_size" not in config else config


def _check_dense_expert(
    source: ExpertSource,
    base_config: dict,
    base_layers: int,
    target: Architecture,
    same_intermediate: bool,
    aligned_vocab: bool,
) -> None:
    where = f"{source.label}.source_model ({source.entry.source_model})"
    model_type = source.model.config.get("model_type")
    if source.arch.dense_mlp is None or model_type not in _bases(target):
        raise ConfigError(
            f"{where}: a {model_type!r} model cannot be an expert of {target.name} "
            f"(expected one of {', '.join(_bases(target))})"
        )
    config = _text_config(source.model.config)
    keys = [
        k
        for k in SIZE_KEYS
        if (same_intermediate or k != "intermediate_size") and not (aligned_vocab and k == "vocab_size")
    ]
    for key in keys:
        if config.get(key) != base_config.get(key):
            hint = " (set tokenizer_source: union or base to map its rows by token)" if key == "vocab_size" else ""
            raise ConfigError(
                f"{where}: {key} {config.get(key)} differs from base_model's {base_config.get(key)}{hint}"
            )
    layers = layer_count(source.model.config, source.arch)  # compared with the base, whose count is checked
    if layers != base_layers:
        raise ConfigError(f"{where}: {layers} layers, but base_model has {base_layers}")


def resolve_sources(recipe: MoeRecipe, pool: ModelPool) -> MoeSources:
    """Open every model (headers only) and check that they can form the requested MoE."""
    base = _open(pool, recipe.base_model, "base_model")
    base_type = base.config.get("model_type")
    base_arch = require_architecture(base.config, model_label="base_model", need="MoE assembly")
    target = infer_architecture(recipe, base_type)
    moe = target.moe
    assert moe is not None, target.name
    if base_type not in moe.dense_bases:
        reason = dict(moe.unfit_bases).get(
            base_type, f"{target.name} is built from {' or '.join(moe.dense_bases)} models"
        )
        raise ConfigError(f"architecture {target.name!r} cannot be built from a {base_type!r} base_model: {reason}")
    if recipe.shared_experts and moe.shared_expert is None:
        with_shared = ", ".join(arch.name for arch in moe_outputs() if _shared(arch) is not None)
        raise ConfigError(
            f"shared_experts: architecture {target.name!r} has no shared expert (only {with_shared} have)"
        )
    if moe.shared_expert is not None and not recipe.shared_experts:
        raise ConfigError(f"shared_experts: architecture {target.name!r} needs at least one shared expert")
    shared_gated = _check_shared_gate(recipe, target)
    base_config = _text_config(base.config)
    if (base_config.get("attention_bias") or base_config.get("mlp_bias")) and not moe.holds_biases:
        raise ConfigError(f"base_model has attention or MLP biases, which {target.name} cannot hold")
    if not moe.holds_sliding_window:
        _warn_sliding_window(base_config, target.name)
    layers = layer_count(base.config, base_arch, base.names, label="base_model")

    def source(label: str, entry: ExpertEntry, same_intermediate: bool) -> ExpertSource:
        model = _open(pool, entry.source_model, f"{label}.source_model")
        arch = require_architecture(model.config, model_label=f"{label}.source_model", need="an MoE expert")
        expert = ExpertSource(label, entry, model, arch)
        _check_dense_expert(
            expert, base_config, layers, target, same_intermediate, recipe.vocabulary_source is not None
        )
        return expert

    experts = [source(f"experts[{i}]", entry, True) for i, entry in enumerate(recipe.experts)]
    shared = tuple(source(f"shared_experts[{i}]", entry, False) for i, entry in enumerate(recipe.shared_experts))
    if len({expert.model.folder for expert in experts}) == 1 and len(experts) > 1:
        log.warning(
            "every expert is the same model (%s): the MoE will behave like that one dense model",
            recipe.experts[0].source_model,
        )
    expert_intermediate = int(base_config["intermediate_size"])
    sources = MoeSources(
        base=base,
        base_arch=base_arch,
        target=target,
        experts=experts,
        shared=shared,
        layers=layers,
        hidden_size=int(base_config["hidden_size"]),
        expert_intermediate=expert_intermediate,
        shared_intermediate=None,
        shared_gated=shared_gated,
    )
    if not shared:
        return sources
    width = sum(sources.shared_widths)
    if moe.shared_count_key:  # the family's shared MLP is n_shared_experts expert widths: pad to a multiple
        width = -(-width // expert_intermediate) * expert_intermediate
    return replace(sources, shared_intermediate=width)


def _check_shared_gate(recipe: MoeRecipe, target: Architecture) -> bool:
    """Whether the shared gate varies with the token (a prompt direction, or router noise); a gate the family
    cannot hold is a recipe mistake."""
    prompt_mode = recipe.gate_mode in PROMPT_GATE_MODES
    fitted = recipe.gate_mode == "fitted"  # its gate is fitted to its own text (moe/fitted.py)
    gated = [
        (i, key)
        for i, entry in enumerate(recipe.shared_experts)
        for key, used in (
            ("positive_prompts", entry.positive_prompts and (prompt_mode or fitted)),
            ("calibration_files", entry.calibration_files and fitted),
            ("noise", entry.noise),
        )
        if used
    ]
    if not gated:
        return False
    index, key = gated[0]
    where = f"shared_experts[{index}].{key}"
    if target.moe is None or target.moe.shared_expert_gate is None:
        raise ConfigError(f"{where}: {target.name}'s shared experts have no gate (always on, weight 1); remove it")
    if len(recipe.shared_experts) > 1:
        raise ConfigError(
            f"{where}: {target.name} has one gate for all its shared experts, so several shared experts cannot "
            "each have a gate of their own; remove it (always on, weight 1)"
        )
    return True


def _warn_sliding_window(config: dict, target: str) -> None:
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", config.get("model_type") == "mistral")
    if window is not None and uses_window and window < config.get("max_position_embeddings", window + 1):
        log.warning(
            "base_model attends within a sliding window of %s tokens; %s attends to the whole context, "
            "so the MoE matches it only on sequences up to that length",
            window,
            target,
        )
