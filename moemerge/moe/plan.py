"""Every output tensor of the MoE, named as transformers' save_pretrained writes it, and where it comes from."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moemerge.architectures import Role, layer_of
from moemerge.errors import TensorError
from moemerge.io.loader import LazyModel
from moemerge.moe.sources import ExpertSource, MoeSources
from moemerge.vocab.alignment import OutputVocabulary, VocabRows


class Origin(str, Enum):
    COPY = "copy"  # a base or expert tensor, optionally scaled
    ROUTER = "router"  # one layer's router rows, computed from prompts or a seed
    SHARED_GATE = "shared_gate"  # one layer's shared-expert gate row
    VOCAB = "vocab"  # the base's embeddings or lm_head mapped by token onto the output vocabulary
    CONCAT = "concat"  # several shared experts' projections joined into one wider MLP (zero rows pad it)
    ZEROS = "zeros"  # a tensor the family needs that starts at zero (DeepSeek-style score-correction bias)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    origin: Origin
    model: LazyModel | None = None
    source_name: str | None = None
    scale: float = 1.0
    layer: int | None = None
    noise_scale: float = 0.0  # std of seeded Gaussian noise added before `scale` (an expert's `noise_scale`)
    vocab: VocabRows | None = None  # Origin.VOCAB: row maps of `vocab_inputs` (the base first)
    vocab_inputs: tuple[tuple[LazyModel, str], ...] = ()
    parts: tuple[PlannedTensor, ...] = ()  # Origin.CONCAT: the copies joined along `concat_dim`
    concat_dim: int = 0

    def describe(self) -> str:
        if self.origin is Origin.CONCAT:
            return f"{self.name} {list(self.shape)} <- concat({', '.join(part.source() for part in self.parts)})"
        if self.origin in (Origin.COPY, Origin.VOCAB):
            return f"{self.name} {list(self.shape)} <- {self.source()}"
        return f"{self.name} {list(self.shape)} <- {self.origin.value}"

    def source(self) -> str:
        """Where a copied tensor comes from: model:tensor, with its noise and scale."""
        assert self.model is not None
        scale = f" x {self.scale:g}" if self.scale != 1.0 else ""
        noise = f" + noise {self.noise_scale:g}" if self.noise_scale else ""
        return f"{self.model.label}:{self.source_name}{noise}{scale}"


def _copy(
    model: LazyModel, source_name: str, name: str, expected: tuple[int, ...], scale: float = 1.0, noise: float = 0.0
):
    shape = model.shape(source_name)
    if shape != expected:
        raise TensorError(f"model {model.label!r}: tensor {source_name!r} has shape {list(shape)}, expected {expected}")
    return PlannedTensor(name, shape, Origin.COPY, model, source_name, scale, noise_scale=noise)


def _expert_mlp(
    sources: MoeSources,
    expert: ExpertSource,
    layer: int,
    names: tuple[str, str, str],
    intermediate: int,
    down_scale: float = 1.0,
) -> list[PlannedTensor]:
    """gate/up [I, H] and down [H, I] of one expert at one layer; noise_scale perturbs all three (as mergekit),
    residual_scale multiplies down."""
    dense = expert.arch.dense_mlp
    assert dense is not None
    hidden = sources.hidden_size
    noise = expert.entry.noise_scale or 0.0
    gate_name, up_name, down_name = names
    down_scale *= expert.entry.residual_scale
    return [
        _copy(expert.model, expert.arch.layer_name(layer, dense.gate), gate_name, (intermediate, hidden), 1.0, noise),
        _copy(expert.model, expert.arch.layer_name(layer, dense.up), up_name, (intermediate, hidden), 1.0, noise),
        _copy(
            expert.model,
            expert.arch.layer_name(layer, dense.down),
            down_name,
            (hidden, intermediate),
            down_scale,
            noise,
        ),
    ]


# A Qwen2-MoE shared gate without prompts is a zero row: sigmoid(0) = 1/2 on every token. The shared expert's
# down projection is doubled (exact in binary floating point) so that it adds its whole output, as a shared
# expert without a gate does (mergekit's DeepSeek output); a prompt-routed gate keeps the projection as it is.
CONSTANT_GATE_COMPENSATION = 2.0


def _shared_mlp(sources: MoeSources, layer: int) -> list[PlannedTensor]:
    """The shared experts as one MLP: each expert's gate/up rows and down columns side by side, which sums their
    outputs exactly; zero rows (and columns) pad it to the width the family's config can express."""
    target, moe = sources.target, sources.target.moe
    assert moe is not None and moe.shared_expert is not None and sources.shared_intermediate is not None
    shared = moe.shared_expert
    names = tuple(target.layer_name(layer, suffix) for suffix in (shared.gate, shared.up, shared.down))
    scale = 1.0
    if moe.shared_expert_gate is not None and not sources.shared_gated:
        scale = CONSTANT_GATE_COMPENSATION
    blocks = []
    for index, (source, width) in enumerate(zip(sources.shared, sources.shared_widths, strict=True)):
        part_names = names if len(sources.shared) == 1 else tuple(f"{name}@shared_experts[{index}]" for name in names)
        blocks.append(_expert_mlp(sources, source, layer, part_names, width, down_scale=scale))
    if len(blocks) == 1 and sources.shared_widths[0] == sources.shared_intermediate:
        return blocks[0]
    hidden, width = sources.hidden_size, sources.shared_intermediate
    return [
        PlannedTensor(
            name,
            (hidden, width) if dim == 1 else (width, hidden),
            Origin.CONCAT,
            parts=tuple(block[position] for block in blocks),
            concat_dim=dim,
        )
        for position, (name, dim) in enumerate(zip(names, (0, 0, 1), strict=True))
    ]


def _layer_tensors(sources: MoeSources, layer: int) -> list[PlannedTensor]:
    target, moe = sources.target, sources.target.moe
    assert moe is not None
    router_shape = (len(sources.experts), sources.hidden_size)
    planned = [PlannedTensor(target.layer_name(layer, moe.router), router_shape, Origin.ROUTER, layer=layer)]
    if moe.correction_bias is not None:  # chooses experts only; zero leaves the router's own choice
        planned.append(PlannedTensor(target.layer_name(layer, moe.correction_bias), router_shape[:1], Origin.ZEROS))
    for index, expert in enumerate(sources.experts):
        names = tuple(
            target.layer_name(layer, template.format(expert=index))
            for template in (moe.expert_gate, moe.expert_up, moe.expert_down)
        )
        planned += _expert_mlp(sources, expert, layer, names, sources.expert_intermediate)
    if sources.shared:
        planned += _shared_mlp(sources, layer)
        if moe.shared_expert_gate is not None:
            gate_name = target.layer_name(layer, moe.shared_expert_gate)
            planned.append(PlannedTensor(gate_name, (1, sources.hidden_size), Origin.SHARED_GATE, layer=layer))
    return planned


def _is_buffer(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # old checkpoints saved this buffer; the MoE recomputes it


def _vocab_tensor(sources: MoeSources, name: str, vocabulary: OutputVocabulary) -> PlannedTensor:
    """The base's embeddings or lm_head in the output vocabulary; tokens the base lacks take the experts' rows."""
    models = {sources.base.label: sources.base}
    for expert in [*sources.experts, *sources.shared]:
        models.setdefault(expert.entry.source_model, expert.model)
    inputs = []
    for model in models.values():
        stored = next((n for n in (name, *sources.base_arch.tied_names(name)) if model.has(n)), None)
        if stored is None:
            raise TensorError(f"model {model.label!r} has no tensor {name!r}")
        if model.shape(stored)[1:] != sources.base.shape(name)[1:]:
            raise TensorError(f"model {model.label!r}: {stored!r} has shape {list(model.shape(stored))}")
        inputs.append((model, stored))
    shape = (vocabulary.size, *sources.base.shape(name)[1:])
    rows = vocabulary.rows_for(list(models), sources.base.label, name)
    return PlannedTensor(name, shape, Origin.VOCAB, sources.base, name, vocab=rows, vocab_inputs=tuple(inputs))


def plan_moe(sources: MoeSources, vocabulary: OutputVocabulary | None = None) -> list[PlannedTensor]:
    """Base tensors except the dense MLPs, then per layer: router, experts, shared expert; in a stable order."""
    base, base_arch = sources.base, sources.base_arch
    head: list[PlannedTensor] = []
    tail: list[PlannedTensor] = []
    per_layer: dict[int, list[PlannedTensor]] = {layer: [] for layer in range(sources.layers)}
    for name in sorted(base.names):
        if _is_buffer(name):
            continue
        layer = layer_of(name)
        role = base_arch.role_of(name)
        if layer is None:
            vocab_tensor = vocabulary is not None and role in (Role.EMBEDDING, Role.LM_HEAD)
            tensor = (
                _vocab_tensor(sources, name, vocabulary) if vocab_tensor else _copy(base, name, name, base.shape(name))
            )
            (head if role is Role.EMBEDDING else tail).append(tensor)
        elif role is not Role.MLP:
            if layer not in per_layer:
                raise TensorError(f"base_model has tensor {name!r} beyond its {sources.layers} layers")
            per_layer[layer].append(_copy(base, name, name, base.shape(name)))
    planned = head
    for layer in range(sources.layers):
        planned += per_layer[layer] + _layer_tensors(sources, layer)
    return planned + tail
