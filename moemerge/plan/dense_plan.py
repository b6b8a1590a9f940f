"""Plan a dense merge: for every output tensor, which input tensors, which parameters, what shape and dtype.

Planning reads only configs and safetensors headers, never tensor data, so every recipe error
(missing model, missing tensor, bad parameter, mismatched shape) surfaces before the first byte is merged.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moemerge.architectures import (
    Architecture,
    Role,
    architecture_for_config,
    layer_count,
    layer_count_section,
    mixed_kinds,
    model_kind,
    set_layer_count,
)
from moemerge.config.merge_recipe import MergeRecipe, OutputSlice, SliceSource
from moemerge.errors import ConfigError, MoemergeError, TensorError
from moemerge.io.loader import LazyModel, ModelPool
from moemerge.io.writer import TensorSpec
from moemerge.methods.registry import MergeMethod, Params, get_method
from moemerge.plan.modules import ModuleRecipe, recipe_modules
from moemerge.plan.parameters import check_names, layer_position, resolve_method_params, resolve_model_params
from moemerge.vocab.alignment import OutputVocabulary, VocabRows
from moemerge.vocab.build import build_vocabulary, embedding_rows, output_vocab_config, tokenizer_folder

log = logging.getLogger(__name__)

VOCAB_ROLES = (Role.EMBEDDING, Role.LM_HEAD)


@dataclass(frozen=True)
class TensorInput:
    model: str
    name: str


@dataclass(frozen=True)
class TensorMerge:
    """One output tensor: the method's inputs (base separate) and the parameters resolved for it."""

    spec: TensorSpec
    inputs: tuple[TensorInput, ...]
    base: TensorInput | None
    model_params: tuple[Params, ...]
    method_params: Params
    fit_vocab: bool = False  # embeddings/lm_head of differing vocab sizes: align rows to the output
    vocab: VocabRows | None = None  # embeddings/lm_head mapped by token onto the output vocabulary (inputs, base)


@dataclass
class MergePlan:
    method: MergeMethod
    merges: list[TensorMerge]
    reference: str  # the model whose config, names and tokenizer shape the output
    config: dict
    layer_count: int
    math_dtype: torch.dtype
    tokenizer_folder: Path
    models: list[str] = field(default_factory=list)
    vocabulary: OutputVocabulary | None = None  # the rebuilt output tokenizer, when the recipe asks for one

    @property
    def output_bytes(self) -> int:
        return sum(merge.spec.nbytes for merge in self.merges)


def _model_layers(model: LazyModel, arch: Architecture) -> int:
    if arch.name != "unknown":
        return layer_count(model.config, arch, model.names, label=f"model {model.label!r}")
    layers = [index for index in map(arch.layer_of, model.names) if index is not None]
    if not layers:
        raise ConfigError(f"model {model.label!r}: unknown architecture and no '.layers.N.' tensors to merge by layer")
    return max(layers) + 1


def _normalised_slices(
    recipe: MergeRecipe, module: ModuleRecipe, method: MergeMethod, pool: ModelPool, arch: Architecture
) -> list[OutputSlice]:
    """The module as slices: `models:` is one slice spanning every layer of every model."""
    if module.slices is not None:
        return module.slices
    entries = list(module.models or [])
    adds_base = method.takes_base(recipe.base_model) or (method.base_is_input and recipe.base_model)
    if adds_base and recipe.base_model not in [entry.model for entry in entries]:
        entries.append(SliceSource(model=recipe.base_model, layer_range=(0, 1)))  # range fixed below
    counts = {entry.model: _model_layers(pool.get(entry.model), arch) for entry in entries}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{model} ({count})" for model, count in counts.items())
        raise ConfigError(f"{module.where}models: layer counts differ ({listed}); use 'slices' to choose layer ranges")
    sources = [
        SliceSource(model=entry.model, parameters=entry.parameters, layer_range=(0, counts[entry.model]))
        for entry in entries
    ]
    return [OutputSlice(sources=sources)]


def _check_sources(recipe: MergeRecipe, module: ModuleRecipe, method: MergeMethod, slices: list[OutputSlice]) -> None:
    where = f"{module.where}models" if module.slices is None else f"{module.where}slices"
    check_names(method, recipe.parameters, "parameters")
    if module.where:
        check_names(method, module.parameters, f"{module.where}parameters")
    for index, output_slice in enumerate(slices):
        base = output_slice.base_model or recipe.base_model
        takes_base = method.takes_base(base)
        others = [source for source in output_slice.sources if not (takes_base and source.model == base)]
        label = where if module.slices is None else f"{where}[{index}]"
        if module.slices is not None:
            check_names(method, output_slice.parameters, f"{label}.parameters")
        for position, source in enumerate(output_slice.sources):
            source_label = f"{where}[{position}]" if module.slices is None else f"{label}.sources[{position}]"
            check_names(method, source.parameters, f"{source_label}.parameters")
        if method.single_source and len(output_slice.sources) != 1:
            raise ConfigError(
                f"{label}: {method.name} takes exactly one model per slice, got {len(output_slice.sources)}"
            )
        if method.model_count is not None and len(others) != method.model_count:
            raise ConfigError(
                f"{label}: {method.name} merges base_model with exactly {method.model_count} other model(s), "
                f"got {len(others)}"
            )
        if method.uses_base and not others:
            raise ConfigError(f"{label}: {method.name} needs at least one model besides base_model {base!r}")
        if len(others) < method.min_model_count:
            raise ConfigError(
                f"{label}: {method.name} needs at least {method.min_model_count} models besides base_model, "
                f"got {len(others)}"
            )


def model_references(recipe: MergeRecipe) -> list[tuple[str, str]]:
    """(recipe key, model reference) for every model the recipe reads, base_model first, then in recipe order."""
    references = [("base_model", recipe.base_model)] if recipe.base_model else []
    groups = (
        {"": recipe}
        if recipe.modules is None
        else {f"modules.{name}.": group for name, group in recipe.modules.items()}
    )
    for where, group in groups.items():
        references += [(f"{where}models[{i}].model", entry.model) for i, entry in enumerate(group.models or [])]
        for j, output_slice in enumerate(group.slices or []):
            if output_slice.base_model:
                references.append((f"{where}slices[{j}].base_model", output_slice.base_model))
            references += [
                (f"{where}slices[{j}].sources[{k}].model", source.model)
                for k, source in enumerate(output_slice.sources)
            ]
    return references


def open_models(recipe: MergeRecipe, pool: ModelPool, *, allow_crimes: bool = False) -> None:
    """Open every model of the recipe (configs and headers only): a model that is not found names its recipe key,
    and models of different architectures are refused unless allow_crimes (as mergekit)."""
    references = model_references(recipe)
    for key, reference in references:
        try:
            pool.get(reference)
        except MoemergeError as error:
            raise type(error)(f"{key}: {error}") from None
    models = dict.fromkeys(reference for _, reference in references)
    mixed = mixed_kinds({model: model_kind(pool.get(model).config) for model in models})
    if mixed is None:
        return
    groups = [recipe] if recipe.modules is None else list(recipe.modules.values())
    where = "slices" if any(group.slices for group in groups) else "models"
    if recipe.modules is not None:
        where = f"modules.{next(iter(recipe.modules))}.{where}"
    if not allow_crimes:
        raise ConfigError(f"{where}: architectures differ: {mixed} (--allow-crimes merges them anyway)")
    log.warning("%s: architectures differ: %s; merging them as --allow-crimes asks", where, mixed)


class _Planner:
    def __init__(self, recipe: MergeRecipe, pool: ModelPool, allow_crimes: bool):
        self.recipe = recipe
        self.pool = pool
        self.allow_crimes = allow_crimes
        self.method = get_method(recipe.merge_method)
        if self.method.uses_base and not recipe.base_model:
            raise ConfigError(f"base_model: required by merge_method {self.method.name!r}")
        open_models(recipe, pool, allow_crimes=allow_crimes)
        self.reference = recipe.base_model or _first_model(recipe)
        self.reference_model = pool.get(self.reference)
        self.arch = architecture_for_config(self.reference_model.config, model_label=self.reference)
        (self.module,) = recipe_modules(recipe, self.arch)
        self.slices = _normalised_slices(recipe, self.module, self.method, pool, self.arch)
        _check_sources(recipe, self.module, self.method, self.slices)
        self.models = list(dict.fromkeys(s.model for sl in self.slices for s in sl.sources))
        if recipe.base_model and recipe.base_model not in self.models:
            self.models.append(recipe.base_model)
        self.vocabulary = self._output_vocabulary()
        self.merges: list[TensorMerge] = []
        self.source_layers: list[tuple[str, int]] = []  # output layer -> (model, layer) it came from

    def plan(self) -> MergePlan:
        pre, post = self._model_level_names()
        self._plan_model_level(pre, self.slices[0])
        offset = 0
        for index, output_slice in enumerate(self.slices):
            offset = self._plan_slice(index, output_slice, offset)
        self._plan_model_level(post, self.slices[-1])
        config = output_vocab_config(
            self._output_config(offset), self.arch, [merge.spec for merge in self.merges], self.vocabulary
        )
        math_dtype = self.recipe.math_dtype or torch.float32
        source = self.recipe.vocabulary_source
        folder = self.reference_model.folder if source in (None, "base", "union") else tokenizer_folder(source)
        return MergePlan(
            self.method,
            self.merges,
            self.reference,
            config,
            offset,
            math_dtype,
            folder,
            self.models,
            self.vocabulary,
        )

    def _output_vocabulary(self) -> OutputVocabulary | None:
        """The output tokenizer and row maps, when the recipe rebuilds the vocabulary (tokenizer_source/tokenizer)."""
        source = self.recipe.vocabulary_source
        if source is None:
            return None
        spec = self.recipe.tokenizer
        return build_vocabulary(
            source,
            self.models,
            self.reference,
            self.pool,
            embedding_rows(self.pool, self.models, self.arch),
            tokens=spec.tokens if spec else None,
            pad_to_multiple_of=spec.pad_to_multiple_of if spec else None,
        )

    def _stored_name(self, model: LazyModel, name: str) -> str:
        """`name`, or the tensor the model ties it to when it has no `name` of its own (lm_head -> embeddings)."""
        if model.has(name):
            return name
        return next((tied for tied in self.arch.tied_names(name) if model.has(tied)), name)

    def _model_level_names(self) -> tuple[list[str], list[str]]:
        """Tensors outside the layers: embeddings (from the first slice) and final norm/lm_head (from the last)."""
        pre, post = [], []
        for name in self.reference_model.names:
            if self.arch.layer_of(name) is not None or name in self.arch.lm_head:
                continue
            role = self.arch.role_of(name)
            is_pre = role == Role.EMBEDDING or (role == Role.OTHER and ("embed" in name or "wte" in name))
            (pre if is_pre else post).append(name)
        # mergekit's optional lm_head: written when an input of the last slice stores one (whether or not the reference
        # does), else left to the tied embeddings; inputs that tie it give their embeddings
        last = [s.model for s in self.slices[-1].sources] + [self._base_of(self.slices[-1])]
        for name in self.arch.lm_head:
            if any(self.pool.get(model).has(name) for model in filter(None, last)):
                post.append(name)
        return pre, post

    def _base_of(self, output_slice: OutputSlice) -> str | None:
        base = output_slice.base_model or self.recipe.base_model
        return base if self.method.takes_base(base) else None

    def _plan_model_level(self, names: list[str], output_slice: OutputSlice) -> None:
        base = self._base_of(output_slice)
        for name in names:
            sources = [(s, name) for s in output_slice.sources if s.model != base]
            self._add(name, sources, (base, name) if base else None, output_slice, t=0.0)

    def _plan_slice(self, index: int, output_slice: OutputSlice, offset: int) -> int:
        """Per-layer tensors of one slice, renumbered to follow the layers already planned."""
        base = self._base_of(output_slice)
        base_source = next((s for s in output_slice.sources if s.model == base), None)
        first = output_slice.sources[0]
        template = base_source or first
        for source in output_slice.sources:
            self._check_range(index, source)
        start, end = template.layer_range
        length = end - start
        template_model = self.pool.get(template.model)
        for step in range(length):
            layer_names = [n for n in template_model.names if self.arch.layer_of(n) == start + step]
            if not layer_names:
                raise TensorError(f"model {template.model!r} has no tensors for layer {start + step}")
            t = layer_position(step, length)
            for name in layer_names:
                inputs = [
                    (source, self.arch.with_layer(name, source.layer_range[0] + step))
                    for source in output_slice.sources
                    if source.model != base
                ]
                base_input = None
                if base:
                    base_start = (base_source or first).layer_range[0]
                    base_input = (base, self.arch.with_layer(name, base_start + step))
                self._add(self.arch.with_layer(name, offset + step), inputs, base_input, output_slice, t=t)
            self.source_layers.append((template.model, start + step))
        return offset + length

    def _check_range(self, index: int, source: SliceSource) -> None:
        if self.module.slices is None:
            return
        count = _model_layers(self.pool.get(source.model), self.arch)
        if source.layer_range[1] > count:
            raise ConfigError(
                f"{self.module.where}slices[{index}]: layer_range {list(source.layer_range)} of {source.model!r} "
                f"goes past its {count} layers"
            )

    def _add(
        self,
        output_name: str,
        inputs: list[tuple[SliceSource, str]],
        base: tuple[str, str] | None,
        output_slice: OutputSlice,
        t: float,
    ) -> None:
        reference_model, reference_name = (base[0], base[1]) if base else (inputs[0][0].model, inputs[0][1])
        reference = self.pool.get(reference_model)
        reference_name = self._stored_name(reference, reference_name)
        if base:
            base = (base[0], self._stored_name(self.pool.get(base[0]), base[1]))
        if not reference.has(reference_name):
            raise TensorError(f"model {reference_model!r} has no tensor {reference_name!r}")
        shape = reference.shape(reference_name)
        aligned = self.vocabulary is not None and self.arch.role_of(output_name) in VOCAB_ROLES
        if aligned:
            shape = (self.vocabulary.size, *shape[1:])
        fit_vocab = False
        kept: list[tuple[SliceSource, str]] = []
        wanted_names: list[str] = []  # what parameter filters see: lm_head even where a tied model gives embeddings
        for source, wanted in inputs:
            model = self.pool.get(source.model)
            name = self._stored_name(model, wanted)
            if not model.has(name):
                raise TensorError(f"model {source.model!r} has no tensor {name!r} (needed for {output_name})")
            other = model.shape(name)
            if aligned and other[1:] == shape[1:]:
                pass  # rows are mapped by token onto the output vocabulary
            elif other != shape:
                if self.arch.role_of(output_name) in VOCAB_ROLES and other[1:] == shape[1:]:
                    log.warning(
                        "%s: %s has %d rows, output keeps %d (vocab sizes differ)",
                        output_name,
                        source.model,
                        other[0],
                        shape[0],
                    )
                    fit_vocab = True
                elif self.allow_crimes:
                    log.warning(
                        "%s: skipping %s, shape %s != %s (--allow-crimes)", output_name, source.model, other, shape
                    )
                    continue
                else:
                    raise TensorError(
                        f"{output_name}: shape {list(other)} in {source.model!r} does not match {list(shape)} "
                        f"in {reference_model!r} (use --allow-crimes to skip mismatched inputs)"
                    )
            kept.append((source, name))
            wanted_names.append(wanted)
        if not kept:
            raise TensorError(f"{output_name}: no input left to merge after skipping mismatched shapes")
        levels_global = [output_slice.parameters, self.module.parameters, self.recipe.parameters]
        # per-model filters match the source tensor's own name (as mergekit), not the renumbered output name
        model_params = tuple(
            resolve_model_params(self.method, [source.parameters, *levels_global], name, t, source.model)
            for (source, _), name in zip(kept, wanted_names, strict=True)
        )
        method_params = resolve_method_params(self.method, levels_global, output_name, t)
        dtype = self.recipe.saved_dtype or self._promoted_dtype(kept, base)
        vocab = None
        if aligned:
            assert self.vocabulary is not None
            models = [source.model for source, _ in kept] + ([base[0]] if base else [])
            preferred = output_slice.base_model or self.recipe.base_model
            vocab = self.vocabulary.rows_for(models, preferred, output_name)
        self.merges.append(
            TensorMerge(
                spec=TensorSpec(output_name, shape, dtype),
                inputs=tuple(TensorInput(source.model, name) for source, name in kept),
                base=TensorInput(*base) if base else None,
                model_params=model_params,
                method_params=method_params,
                fit_vocab=fit_vocab,
                vocab=vocab,
            )
        )

    def _promoted_dtype(self, inputs: list[tuple[SliceSource, str]], base: tuple[str, str] | None) -> torch.dtype:
        """Without `dtype`, a tensor keeps the promoted dtype of its inputs (bf16 + float32 → float32), as mergekit."""
        stored = [(source.model, name) for source, name in inputs] + ([base] if base else [])
        dtypes = [self.pool.get(model).dtype(name) for model, name in stored]
        promoted = dtypes[0]
        for dtype in dtypes[1:]:
            promoted = torch.promote_types(promoted, dtype)
        return promoted

    def _output_config(self, total_layers: int) -> dict:
        config = copy.deepcopy(self.reference_model.config)
        old_layers = _model_layers(self.reference_model, self.arch)
        if [layer for _, layer in self.source_layers] == list(range(old_layers)):
            return config
        set_layer_count(config, self.arch, total_layers)
        section = layer_count_section(config, self.arch)  # text_config for vision-language models
        for key, value in list(section.items()):
            # per-layer settings (e.g. layer_types) follow the layers they describe, from the model they came from
            if isinstance(value, list) and len(value) == old_layers and key != "architectures":
                section[key] = [self._per_layer_setting(key, model, layer) for model, layer in self.source_layers]
        for key in self.arch.layer_index_keys:
            # lists of layer indices (mlp_only_layers, moe_layers) name the output layers whose source was listed
            if isinstance(section.get(key), list):
                section[key] = [
                    index
                    for index, (model, layer) in enumerate(self.source_layers)
                    if layer in (layer_count_section(self.pool.get(model).config, self.arch).get(key) or [])
                ]
        return config

    def _per_layer_setting(self, key: str, model: str, layer: int):
        values = layer_count_section(self.pool.get(model).config, self.arch).get(key)
        if not isinstance(values, list) or layer >= len(values):
            values = layer_count_section(self.reference_model.config, self.arch)[key]
        return values[layer]


def _first_model(recipe: MergeRecipe) -> str:
    module = next(iter(recipe.modules.values())) if recipe.modules else recipe
    return module.models[0].model if module.models else module.slices[0].sources[0].model


def plan_merge(recipe: MergeRecipe, pool: ModelPool, *, allow_crimes: bool = False) -> MergePlan:
    """Every output tensor of the merge, validated; raises MoemergeError on any recipe or input problem."""
    return _Planner(recipe, pool, allow_crimes).plan()
