"""Write an MoE as a dense model: attention, norms and embeddings kept, each layer's experts turned into one MLP.

Every dense mode is a per-layer `LayerMix`: a list of experts with a scale each, joined into one
wider SwiGLU MLP (gate/up rows concatenated, down_proj columns concatenated, each expert's block of
columns multiplied by its scale). Since

    down · (act(gate·x) ⊙ up·x) with stacked blocks = Σ_e scale_e · down_e · (act(gate_e·x) ⊙ up_e·x),

this is exactly the fixed mixture Σ_e scale_e · expert_e(x). One expert with scale 1 is that expert;
`--average` instead averages the experts' weights (a weight-space baseline, not the mean output).
A shared expert (Qwen2-MoE) is joined in the same way with the scale standing in for its
input-dependent gate sigmoid(shared_expert_gate · x): the calibration mean, or 1.0 without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemerge.architectures import find_architecture, layer_of, with_legacy_rope_keys
from moemerge.errors import MoemergeError
from moemerge.executor import OutputTensor
from moemerge.io.loader import LazyModel
from moemerge.io.writer import TensorSpec
from moemerge.split.experts import MoeSource, Part

KEPT_LEGACY_KEYS = ("rope_theta", "rope_scaling", "torch_dtype", "dtype", "transformers_version")


@dataclass(frozen=True)
class LayerMix:
    """Which experts make up one layer's dense MLP, and how."""

    experts: tuple[int, ...]
    scales: tuple[float, ...]  # one per expert; ignored when average
    average: bool = False
    shared_scale: float = 1.0  # stands in for sigmoid(shared_expert_gate · x); unused without a shared expert

    def describe(self) -> dict:
        described: dict = {"experts": list(self.experts)}
        if self.average:
            described["combine"] = "weight average"
        else:
            described["scales"] = [round(scale, 6) for scale in self.scales]
        return described


def dense_model_type(source: MoeSource) -> str:
    """The dense architecture an expert of this MoE becomes; an error where transformers has none."""
    dense_type = source.moe.dense_type_for(source.config)
    if dense_type is None or find_architecture(dense_type) is None:
        raise MoemergeError(
            f"{source.config.get('model_type')!r} has no dense counterpart in transformers with the same layer "
            "structure, so its experts cannot be written as a dense model; --prune-to K (a smaller MoE) works"
        )
    if dense_type == "qwen2" and source.config.get("qkv_bias", True) is False:
        raise MoemergeError("this Qwen2-MoE has no q/k/v biases (qkv_bias: false), which every Qwen2 dense model has")
    if source.dense_layers():
        raise MoemergeError(
            f"layers {source.dense_layers()} have a dense MLP instead of experts (mlp_only_layers / "
            "decoder_sparse_step); a dense output would need a different MLP width per layer, which the dense "
            "config cannot express; --prune-to K works"
        )
    return dense_type


def mix_width(source: MoeSource, mix: LayerMix) -> int:
    """Intermediate size of the dense MLP a mix produces."""
    width = source.intermediate_size * (1 if mix.average else len(mix.experts))
    if source.has_shared_expert:
        width += source.model.shape(source.shared_name(source.moe_layers[0], "gate"))[0]
    return width


def mixed_part(source: MoeSource, layer: int, mix: LayerMix, part: Part) -> torch.Tensor:
    """One projection of the dense MLP for a layer: experts (and shared expert) stacked or averaged."""
    dtype = source.part_dtype(layer)
    if mix.average:
        total = sum(source.expert_part(layer, expert, part).float() for expert in mix.experts)
        blocks = [(total / len(mix.experts)).to(dtype)]
    else:
        blocks = [
            _scaled(source.expert_part(layer, expert, part), scale, part)
            for expert, scale in zip(mix.experts, mix.scales, strict=True)
        ]
    if source.has_shared_expert:
        blocks.append(_scaled(source.shared_part(layer, part), mix.shared_scale, part))
    return torch.cat(blocks, dim=1 if part == "down" else 0).to(dtype)


def _scaled(weight: torch.Tensor, scale: float, part: Part) -> torch.Tensor:
    """down_proj columns carry the scale; gate/up rows are taken as they are (scale 1 keeps the bits)."""
    if part != "down" or scale == 1.0:
        return weight
    return (weight.float() * scale).to(weight.dtype)


def _single_expert(source: MoeSource, layer: int, mix: LayerMix, part: Part) -> tuple[LazyModel, str] | None:
    """The stored expert tensor a layer's dense projection is unchanged: one expert, no shared expert, no scale."""
    if len(mix.experts) != 1 or mix.average or source.has_shared_expert:
        return None
    if part == "down" and mix.scales[0] != 1.0:
        return None
    return source.stored_expert_part(layer, mix.experts[0], part)


def plan_dense(source: MoeSource, mixes: dict[int, LayerMix]) -> list[OutputTensor]:
    """Every output tensor of the dense model: non-expert tensors copied, one mixed MLP per layer."""
    dense_arch = find_architecture(dense_model_type(source))
    assert dense_arch is not None and dense_arch.dense_mlp is not None
    model = source.model
    outputs = [
        OutputTensor(
            TensorSpec(name, model.shape(name), model.dtype(name)),
            lambda name=name: model.read(name),
            copy_of=(model, name),
        )
        for name in model.names
        if not source.is_expert_tensor(name)
    ]
    suffixes = {"gate": dense_arch.dense_mlp.gate, "up": dense_arch.dense_mlp.up, "down": dense_arch.dense_mlp.down}
    hidden = source.part_shape(source.moe_layers[0], "down")[0]
    for layer in source.moe_layers:
        mix = mixes[layer]
        width = mix_width(source, mix)
        for part, suffix in suffixes.items():
            shape = (hidden, width) if part == "down" else (width, hidden)
            spec = TensorSpec(dense_arch.layer_name(layer, suffix), shape, source.part_dtype(layer))
            outputs.append(
                OutputTensor(
                    spec,
                    lambda layer=layer, mix=mix, part=part: mixed_part(source, layer, mix, part),
                    copy_of=_single_expert(source, layer, mix, part),
                )
            )
    return in_layer_order(outputs)


def in_layer_order(outputs: list[OutputTensor]) -> list[OutputTensor]:
    """Embeddings and final tensors first, then layer by layer, so each shard holds whole layers."""

    def key(output: OutputTensor) -> tuple[int, str]:
        layer = layer_of(output.spec.name)
        return (-1 if layer is None else layer, output.spec.name)

    return sorted(outputs, key=key)


def dense_config(source: MoeSource, intermediate_size: int) -> dict:
    """config.json of the dense counterpart: its keys kept from the MoE config, MoE keys dropped, MLP width set."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    dense_type = dense_model_type(source)
    known = set(CONFIG_MAPPING[dense_type]().to_dict()) | set(KEPT_LEGACY_KEYS)
    config = {key: value for key, value in source.config.items() if key in known}
    config["model_type"] = dense_type
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[dense_type]]
    config["intermediate_size"] = intermediate_size
    return with_legacy_rope_keys(config)
