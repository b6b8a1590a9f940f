"""One table of tensor-name knowledge per architecture: which tensor plays which role.

Dense merges use it to find layers; MoE assembly uses it to place expert MLPs and routers;
expert extraction uses it to read them back. Everything here is data, looked up by
`config.json`'s `model_type`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from moemerge.errors import MoemergeError

log = logging.getLogger(__name__)

LAYER_PATTERN = re.compile(r"^(?P<prefix>.*?\.layers\.)(?P<layer>\d+)\.(?P<suffix>.+)$")


class Role(str, Enum):
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    FINAL_NORM = "final_norm"
    ATTENTION = "attention"
    NORM = "norm"
    MLP = "mlp"
    ROUTER = "router"
    EXPERT = "expert"
    SHARED_EXPERT = "shared_expert"
    SHARED_EXPERT_GATE = "shared_expert_gate"
    OTHER = "other"


@dataclass(frozen=True)
class DenseMlp:
    """Suffixes (after the layer prefix) of a dense SwiGLU MLP."""

    gate: str = "mlp.gate_proj.weight"
    up: str = "mlp.up_proj.weight"
    down: str = "mlp.down_proj.weight"


@dataclass(frozen=True)
class MoeLayout:
    """How a sparse MoE block names its router and experts on disk (as save_pretrained writes them)."""

    router: str  # e.g. "block_sparse_moe.gate.weight"
    expert_gate: str  # template with {expert}, e.g. "block_sparse_moe.experts.{expert}.w1.weight"
    expert_up: str
    expert_down: str
    expert_count_key: str  # config key holding the number of experts
    experts_per_token_key: str
    expert_intermediate_key: str  # config key holding one expert's intermediate size
    shared_expert: DenseMlp | None = None
    shared_expert_gate: str | None = None
    shared_intermediate_key: str | None = None
    # The dense architecture one expert becomes; None where transformers has no dense twin with the same layer
    # structure (OLMoE is pre-norm, OLMo2 post-norm: an OLMoE expert cannot be written as an OLMo2 model).
    dense_model_type: str | None = "mistral"


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layer_prefix: str = "model.layers.{layer}."
    layer_count_key: str = "num_hidden_layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens.weight",)
    final_norm: tuple[str, ...] = ("model.norm.weight",)
    lm_head: tuple[str, ...] = ("lm_head.weight",)
    dense_mlp: DenseMlp | None = DenseMlp()
    moe: MoeLayout | None = None

    def tied_names(self, name: str) -> tuple[str, ...]:
        """Where a model that ties `name` to another tensor keeps it (lm_head -> embeddings): mergekit's tied_names."""
        return self.embeddings if name in self.lm_head else ()

    def layer_name(self, layer: int, suffix: str) -> str:
        return self.layer_prefix.format(layer=layer) + suffix

    def role_of(self, name: str) -> Role:
        """Role of a tensor name in this architecture."""
        if name in self.embeddings:
            return Role.EMBEDDING
        if name in self.lm_head:
            return Role.LM_HEAD
        if name in self.final_norm:
            return Role.FINAL_NORM
        match = LAYER_PATTERN.match(name)
        if not match:
            return Role.OTHER
        return _layer_role(self, match["suffix"])


def _expert_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{expert\}", r"\d+") + "$")


def _layer_role(arch: Architecture, suffix: str) -> Role:
    if suffix.startswith("self_attn."):
        return Role.ATTENTION
    moe = arch.moe
    if moe is not None:
        if suffix == moe.router:
            return Role.ROUTER
        if suffix == moe.shared_expert_gate:
            return Role.SHARED_EXPERT_GATE
        if moe.shared_expert and suffix in (moe.shared_expert.gate, moe.shared_expert.up, moe.shared_expert.down):
            return Role.SHARED_EXPERT
        for template in (moe.expert_gate, moe.expert_up, moe.expert_down):
            if _expert_regex(template).match(suffix):
                return Role.EXPERT
    if "norm" in suffix:
        return Role.NORM
    if suffix.startswith(("mlp.", "block_sparse_moe.")):
        return Role.MLP
    return Role.OTHER


MIXTRAL_MOE = MoeLayout(
    router="block_sparse_moe.gate.weight",
    expert_gate="block_sparse_moe.experts.{expert}.w1.weight",
    expert_up="block_sparse_moe.experts.{expert}.w3.weight",
    expert_down="block_sparse_moe.experts.{expert}.w2.weight",
    expert_count_key="num_local_experts",
    experts_per_token_key="num_experts_per_tok",
    expert_intermediate_key="intermediate_size",
    dense_model_type="mistral",
)


def _qwen_style_moe(dense_model_type: str | None, shared: bool = False) -> MoeLayout:
    return MoeLayout(
        router="mlp.gate.weight",
        expert_gate="mlp.experts.{expert}.gate_proj.weight",
        expert_up="mlp.experts.{expert}.up_proj.weight",
        expert_down="mlp.experts.{expert}.down_proj.weight",
        expert_count_key="num_experts",
        experts_per_token_key="num_experts_per_tok",
        expert_intermediate_key="moe_intermediate_size",
        shared_expert=DenseMlp(
            "mlp.shared_expert.gate_proj.weight",
            "mlp.shared_expert.up_proj.weight",
            "mlp.shared_expert.down_proj.weight",
        )
        if shared
        else None,
        shared_expert_gate="mlp.shared_expert_gate.weight" if shared else None,
        shared_intermediate_key="shared_expert_intermediate_size" if shared else None,
        dense_model_type=dense_model_type,
    )


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",)),
    Architecture("mistral", ("mistral",)),
    Architecture("qwen2", ("qwen2",)),
    Architecture("qwen3", ("qwen3",)),
    Architecture("gemma", ("gemma", "gemma2")),  # tied embeddings: lm_head usually absent
    Architecture(
        "phi3",
        ("phi3",),
        dense_mlp=None,  # fused gate_up_proj: not usable as an MoE expert source
    ),
    Architecture("mixtral", ("mixtral",), dense_mlp=None, moe=MIXTRAL_MOE),
    Architecture("qwen2_moe", ("qwen2_moe",), dense_mlp=None, moe=_qwen_style_moe("qwen2", shared=True)),
    Architecture("qwen3_moe", ("qwen3_moe",), dense_mlp=None, moe=_qwen_style_moe("qwen3")),
    Architecture("olmoe", ("olmoe",), dense_mlp=None, moe=_qwen_style_moe(None)),
)

UNKNOWN = Architecture("unknown", (), dense_mlp=None)


def find_architecture(model_type: str | None) -> Architecture | None:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    return None


def architecture_for_config(config: dict, *, model_label: str = "model") -> Architecture:
    """The table entry for a config.json; unknown types fall back to `.layers.N.` inference with a warning."""
    model_type = config.get("model_type")
    arch = find_architecture(model_type)
    if arch is None:
        log.warning(
            "%s: architecture %r is not in moemerge's table; inferring layers from '.layers.N.' names",
            model_label,
            model_type,
        )
        return UNKNOWN
    return arch


def require_architecture(config: dict, *, model_label: str, need: str) -> Architecture:
    """Like architecture_for_config, but an unknown type is an error (MoE and split need roles)."""
    arch = find_architecture(config.get("model_type"))
    if arch is None:
        raise MoemergeError(
            f"{model_label}: architecture {config.get('model_type')!r} is not supported for {need}; "
            f"supported: {', '.join(t for a in ARCHITECTURES for t in a.model_types)}"
        )
    return arch


def layer_of(name: str) -> int | None:
    """Layer index of a per-layer tensor name, or None for embeddings, final norm, lm_head."""
    match = LAYER_PATTERN.match(name)
    return int(match["layer"]) if match else None


def with_layer(name: str, layer: int) -> str:
    """The same tensor name in another layer (used to renumber stacked slices)."""
    match = LAYER_PATTERN.match(name)
    if not match:
        raise ValueError(f"{name} is not a per-layer tensor")
    return f"{match['prefix']}{layer}.{match['suffix']}"


def layer_count(
    config: dict, arch: Architecture, tensor_names: Iterable[str] | None = None, *, label: str = "model"
) -> int:
    """The config's layer count, checked: a whole number, and (given the tensor names) no more than the weights hold.

    Checked before any loop runs over the layers: a config saying 1e9 layers must fail at once, not loop for hours.
    """
    key = arch.layer_count_key
    config_text = config.get("text_config") if key not in config else None
    source = config_text if isinstance(config_text, dict) else config
    if key not in source:
        raise MoemergeError(f"config.json has no {key!r}: cannot tell how many layers the model has")
    value = source[key]
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 0:
        raise MoemergeError(f"{label}: config.json has {key} {value!r}, not a whole number of layers")
    count = int(value)
    if tensor_names is not None:
        present = {index for index in map(layer_of, tensor_names) if index is not None}
        held = max(present) + 1 if present else 0
        if count > held:
            raise MoemergeError(
                f"{label}: config.json has {key} {count}, but the weights hold tensors for {held} layers"
            )
    return count
