"""One table of architecture knowledge, as data: layer stacks, model-level tensors, MLP and MoE layouts.

Dense merges use it to find and renumber layers; MoE assembly to place expert MLPs and routers;
expert extraction to read them back and to know which router rule and which layers are sparse.
Entries are looked up by `config.json`'s `model_type`. Adding a family is one entry here plus a
test; the families follow what transformers' `save_pretrained` writes (and mergekit 0.1.5's
architecture definitions for families transformers only runs as remote code).

Names are templates: `{layer}` a layer index inside a stack, `{expert}` an expert index. A stack
lists alternative prefixes where checkpoints of one family spell it differently (e.g. Llava's
`language_model.model.layers.N.` vs transformers 5's `model.language_model.layers.N.`), and its
layer count may sit under a nested config key (`text_config.num_hidden_layers`).
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
class Stack:
    """A stack of numbered layers: name prefixes with `{layer}`, and the config key(s) holding its depth.

    The first count key present in a config is read; all present are written. `offset` is the index of
    layer 0 in tensor names (Phi-1's `layers.0` is the embedding)."""

    prefixes: tuple[str, ...]
    count_keys: tuple[str, ...] = ("num_hidden_layers",)
    name: str = "decoder"
    offset: int = 0

    @property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_prefix_regex(prefix) for prefix in self.prefixes)


def _prefix_regex(prefix: str) -> re.Pattern[str]:
    body = re.escape(prefix).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\*", ".*?")
    return re.compile("^" + body + r"(?P<suffix>.+)$")


@dataclass(frozen=True)
class DenseMlp:
    """Suffixes (after the layer prefix) of a dense SwiGLU MLP."""

    gate: str = "mlp.gate_proj.weight"
    up: str = "mlp.up_proj.weight"
    down: str = "mlp.down_proj.weight"

    def parts(self) -> tuple[str, str, str]:
        return (self.gate, self.up, self.down)


@dataclass(frozen=True)
class FusedExperts:
    """All experts of a layer in one tensor per projection (leading dimension: expert).

    orientation "out_in": gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I] (transformers 5 in memory);
    "in_out_interleaved": gate_up [E, H, 2I] with gate and up columns alternating, down [E, I, H] (GPT-OSS).
    `extra` are further per-expert tensors sliced with them (biases)."""

    gate_up: str = "mlp.experts.gate_up_proj"
    down: str = "mlp.experts.down_proj"
    orientation: str = "out_in"
    extra: tuple[str, ...] = ()
    router: str = "mlp.gate.weight"  # the router's name beside experts stored this way

    def names(self) -> tuple[str, ...]:
        """Every per-expert tensor of this layout (leading dimension: expert)."""
        return (self.gate_up, self.down, *self.extra)


@dataclass(frozen=True)
class MoeLayout:
    """How a sparse MoE block names its router and experts on disk, how it routes, and which layers are sparse."""

    router: str  # e.g. "block_sparse_moe.gate.weight"
    expert_gate: str | None  # template with {expert}; None where experts are only stored fused
    expert_up: str | None
    expert_down: str | None
    expert_count_key: str  # config key holding the number of routed experts
    experts_per_token_key: str
    expert_intermediate_key: str  # config key holding one expert's intermediate size
    router_kind: str = "softmax_topk"  # a moemerge.moe.routing kind
    router_bias: str | None = None  # added to the logits (GPT-OSS)
    correction_bias: str | None = None  # added to the scores for choosing only (DeepSeek-V3)
    fused: tuple[FusedExperts, ...] = (FusedExperts(),)  # fused layouts this family may be stored in
    shared_expert: DenseMlp | None = None
    shared_expert_gate: str | None = None  # sigmoid gate on the shared expert (Qwen2-MoE)
    shared_intermediate_key: str | None = None  # config key of the shared expert's width...
    shared_count_key: str | None = None  # ...or of the number of expert-sized shared experts (DeepSeek)
    # Config keys choosing the dense (non-MoE) layers.
    first_dense_key: str | None = None  # first_k_dense_replace
    dense_layers_key: str | None = None  # mlp_only_layers
    sparse_step_key: str | None = None  # decoder_sparse_step
    # The dense architecture one expert becomes; None where transformers has no dense twin with the same layer
    # structure (OLMoE is pre-norm, OLMo2 post-norm; DeepSeek's attention is MLA, no dense class has it).
    dense_model_type: str | None = "mistral"
    # MoE assembly (moemerge-moe): the dense model types this family is built from (same attention, same MLP
    # names; empty: not an output), mergekit-moe's `architecture:` values that select it, why a given dense
    # base cannot be used (base model_type, reason), and whether it holds attention/MLP biases.
    dense_bases: tuple[str, ...] = ()
    recipe_names: tuple[str, ...] = ()
    unfit_bases: tuple[tuple[str, str], ...] = ()
    holds_biases: bool = True
    holds_sliding_window: bool = True  # attends within a base's sliding window (else warned: whole context)
    # Where the dense twin depends on the config (a GLM-4-MoE built from a dense model by moemerge-moe): the first
    # (dense type, ((config key, its default when unset, value needed), ...)) whose values all hold wins.
    dense_twins: tuple[tuple[str, tuple[tuple[str, object, object], ...]], ...] = ()

    def dense_type_for(self, config: dict) -> str | None:
        """The dense architecture one expert of this MoE becomes, by its config; None where there is none."""
        if not self.dense_twins:
            return self.dense_model_type
        config = text_config(config)
        for dense_type, needs in self.dense_twins:
            if all(_config_value(config, key, default) == value for key, default, value in needs):
                return dense_type
        return None

    def expert_templates(self) -> tuple[str, str, str] | None:
        if self.expert_gate is None or self.expert_up is None or self.expert_down is None:
            return None
        return (self.expert_gate, self.expert_up, self.expert_down)

    def is_sparse(self, config: dict, layer: int) -> bool:
        """Whether a layer has experts, by this family's config keys."""
        config = text_config(config)
        if self.first_dense_key and layer < int(config.get(self.first_dense_key) or 0):
            return False
        if self.dense_layers_key and layer in (config.get(self.dense_layers_key) or []):
            return False
        step = int(config.get(self.sparse_step_key) or 1) if self.sparse_step_key else 1
        return (layer + 1) % step == 0


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    stacks: tuple[Stack, ...] = (Stack(("model.layers.{layer}.",)),)
    embeddings: tuple[str, ...] = ("model.embed_tokens.weight",)
    final_norm: tuple[str, ...] = ("model.norm.weight",)
    lm_head: tuple[str, ...] = ("lm_head.weight",)
    tied: tuple[tuple[str, str], ...] = (("lm_head.weight", "model.embed_tokens.weight"),)  # (name, stands in)
    optional: tuple[str, ...] = ()  # model-level names some checkpoints of the family lack
    dense_mlp: DenseMlp | None = DenseMlp()
    moe: MoeLayout | None = None
    model_class: str | None = None  # transformers class name for config["architectures"]
    # Config keys listing decoder layer indices (e.g. which layers are MoE): a frankenmerge renumbers them.
    layer_index_keys: tuple[str, ...] = ("mlp_only_layers", "moe_layers")

    @property
    def decoder(self) -> Stack:
        """The stack slices, passthrough and MoE work on (the text decoder)."""
        return self.stacks[0]

    @property
    def layer_prefix(self) -> str:
        return self.decoder.prefixes[0]

    @property
    def layer_count_key(self) -> str:
        return self.decoder.count_keys[0]

    def tied_names(self, name: str) -> tuple[str, ...]:
        """Where a model that ties `name` to another tensor keeps it (lm_head -> embeddings): mergekit's tied_names."""
        return tuple(stand_in for tied, stand_in in self.tied if tied == name)

    def layer_name(self, layer: int, suffix: str) -> str:
        return self.layer_prefix.format(layer=layer + self.decoder.offset) + suffix

    def _match(self, name: str, stack: Stack) -> re.Match[str] | None:
        if name in self.embeddings or name in self.final_norm or name in self.lm_head:
            return None
        return next((match for pattern in stack.patterns if (match := pattern.match(name))), None)

    def layer_of(self, name: str) -> int | None:
        """Decoder layer of a tensor name; None for model-level tensors and other stacks (e.g. vision)."""
        match = self._match(name, self.decoder)
        return int(match["layer"]) - self.decoder.offset if match else None

    def with_layer(self, name: str, layer: int) -> str:
        """The same tensor name in another decoder layer (used to renumber stacked slices)."""
        match = self._match(name, self.decoder)
        if not match:
            raise ValueError(f"{name} is not a per-layer tensor of the {self.name} decoder")
        start, end = match.span("layer")
        return f"{name[:start]}{layer + self.decoder.offset}{name[end:]}"

    def suffix_of(self, name: str) -> str | None:
        match = self._match(name, self.decoder)
        return match["suffix"] if match else None

    def stack_of(self, name: str) -> str | None:
        """Name of the stack a per-layer tensor belongs to, or None."""
        return next((stack.name for stack in self.stacks if self._match(name, stack)), None)

    def role_of(self, name: str) -> Role:
        """Role of a tensor name in this architecture."""
        if name in self.embeddings:
            return Role.EMBEDDING
        if name in self.lm_head:
            return Role.LM_HEAD
        if name in self.final_norm:
            return Role.FINAL_NORM
        suffix = self.suffix_of(name)
        return Role.OTHER if suffix is None else _layer_role(self, suffix)


ATTENTION_PREFIXES = ("self_attn.", "attn.", "attention.", "self_attention.", "linear_attn.", "mixer.")
MLP_PREFIXES = ("mlp.", "block_sparse_moe.", "feed_forward.", "ffn.", "shared_mlp.")


def _expert_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{expert\}", r"\d+") + "$")


def _layer_role(arch: Architecture, suffix: str) -> Role:
    if suffix.startswith(ATTENTION_PREFIXES):
        return Role.ATTENTION
    moe = arch.moe
    if moe is not None:
        if suffix in (moe.router, moe.router_bias, moe.correction_bias):
            return Role.ROUTER
        if suffix == moe.shared_expert_gate:
            return Role.SHARED_EXPERT_GATE
        if moe.shared_expert and suffix in moe.shared_expert.parts():
            return Role.SHARED_EXPERT
        for template in moe.expert_templates() or ():
            if _expert_regex(template).match(suffix):
                return Role.EXPERT
        for fused in moe.fused:
            if suffix in fused.names():
                return Role.EXPERT
            if suffix == fused.router:
                return Role.ROUTER
    if "norm" in suffix or suffix.startswith("ln"):
        return Role.NORM
    if suffix.startswith(MLP_PREFIXES):
        return Role.MLP
    return Role.OTHER


# ---------------------------------------------------------------------------------------------------------------
# Compact constructors for the table


def _decoder(name: str, *types: str, **fields) -> Architecture:
    """A `model.layers.N.` decoder (Llama layout) unless fields say otherwise."""
    return Architecture(name, types or (name,), **fields)


def _gpt(name: str, *types: str, root: str = "transformer", count: str = "n_layer", **fields) -> Architecture:
    """GPT-2-style naming: `transformer.h.N.`, `transformer.wte`, `transformer.ln_f`."""
    fields.setdefault("embeddings", (f"{root}.wte.weight", f"{root}.wpe.weight"))
    fields.setdefault("final_norm", (f"{root}.ln_f.weight", f"{root}.ln_f.bias"))
    fields.setdefault("tied", (("lm_head.weight", f"{root}.wte.weight"),))
    fields.setdefault("dense_mlp", None)
    return Architecture(name, types or (name,), stacks=(Stack((f"{root}.h.{{layer}}.",), (count,)),), **fields)


def _biased_norm(prefix: str = "model.norm") -> tuple[str, ...]:
    return (f"{prefix}.weight", f"{prefix}.bias")


def _vision_language(
    name: str,
    *types: str,
    text: tuple[str, ...],
    vision: tuple[str, ...],
    vision_count: tuple[str, ...] = ("vision_config.num_hidden_layers",),
    text_count: tuple[str, ...] = ("text_config.num_hidden_layers",),
    text_roots: tuple[str, ...] = ("language_model.model", "model.language_model"),
    head_roots: tuple[str, ...] = ("language_model.lm_head", "lm_head"),
    **fields,
) -> Architecture:
    """A vision tower beside a text decoder: slices and layer counts follow the text stack only."""
    embeddings = tuple(f"{root}.embed_tokens.weight" for root in text_roots)
    heads = tuple(f"{root}.weight" for root in head_roots)
    return Architecture(
        name,
        types or (name,),
        stacks=(Stack(text, text_count), Stack(vision, vision_count, name="vision")),
        embeddings=embeddings,
        final_norm=tuple(f"{root}.norm.weight" for root in text_roots),
        lm_head=heads,
        tied=tuple((head, embedding) for head in heads for embedding in embeddings),
        **fields,
    )


def _encoder(
    name: str,
    *types: str,
    roots: tuple[str, ...],
    stack: str = "encoder.layer.{layer}.",
    count_keys: tuple[str, ...] = ("num_hidden_layers",),
) -> Architecture:
    """BERT-style encoders, bare (`encoder.layer.N.`) or under a task head (`bert.encoder.layer.N.`)."""
    prefixes = tuple(f"{root}.{stack}" if root else stack for root in roots)
    embeddings = tuple(
        f"{root + '.' if root else ''}embeddings.{part}.weight"
        for root in roots
        for part in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    )
    return Architecture(
        name,
        types or (name,),
        stacks=(Stack(prefixes, count_keys),),
        embeddings=embeddings,
        final_norm=(),
        lm_head=(),
        tied=(),
        dense_mlp=None,
    )


MIXTRAL_MOE = MoeLayout(
    router="block_sparse_moe.gate.weight",
    expert_gate="block_sparse_moe.experts.{expert}.w1.weight",
    expert_up="block_sparse_moe.experts.{expert}.w3.weight",
    expert_down="block_sparse_moe.experts.{expert}.w2.weight",
    expert_count_key="num_local_experts",
    experts_per_token_key="num_experts_per_tok",
    expert_intermediate_key="intermediate_size",
    # transformers 5 renames the block to `mlp` in memory: a state_dict() checkpoint is fused under `mlp.experts.`
    fused=(
        FusedExperts(
            "block_sparse_moe.experts.gate_up_proj",
            "block_sparse_moe.experts.down_proj",
            router="block_sparse_moe.gate.weight",
        ),
        FusedExperts(),
    ),
    dense_model_type="mistral",
    dense_bases=("llama", "mistral"),
    recipe_names=("mixtral",),
    unfit_bases=(
        ("qwen3", "Mixtral attention has no q_norm/k_norm; use architecture qwen3_moe"),
        ("qwen2", "Mixtral attention has no q/k/v biases; use architecture qwen2_moe with a shared expert"),
    ),
    holds_biases=False,
)

QWEN_EXPERTS = dict(
    router="mlp.gate.weight",
    expert_gate="mlp.experts.{expert}.gate_proj.weight",
    expert_up="mlp.experts.{expert}.up_proj.weight",
    expert_down="mlp.experts.{expert}.down_proj.weight",
    experts_per_token_key="num_experts_per_tok",
    expert_intermediate_key="moe_intermediate_size",
)


def _qwen_moe(dense_model_type: str | None, shared: bool = False, **assembly) -> MoeLayout:
    return MoeLayout(
        **QWEN_EXPERTS,
        expert_count_key="num_experts",
        shared_expert=DenseMlp(
            "mlp.shared_expert.gate_proj.weight",
            "mlp.shared_expert.up_proj.weight",
            "mlp.shared_expert.down_proj.weight",
        )
        if shared
        else None,
        shared_expert_gate="mlp.shared_expert_gate.weight" if shared else None,
        shared_intermediate_key="shared_expert_intermediate_size" if shared else None,
        dense_layers_key="mlp_only_layers",
        sparse_step_key="decoder_sparse_step",
        dense_model_type=dense_model_type,
        **assembly,
    )


def _deepseek_moe(router_kind: str, expert_count_key: str, **extra) -> MoeLayout:
    """DeepSeek-V2/V3 and GLM-4-MoE: n_shared_experts expert-sized shared experts as one MLP, first k layers dense."""
    return MoeLayout(
        **QWEN_EXPERTS,
        expert_count_key=expert_count_key,
        router_kind=router_kind,
        correction_bias="mlp.gate.e_score_correction_bias" if router_kind == "sigmoid_group" else None,
        shared_expert=DenseMlp(
            "mlp.shared_experts.gate_proj.weight",
            "mlp.shared_experts.up_proj.weight",
            "mlp.shared_experts.down_proj.weight",
        ),
        shared_count_key="n_shared_experts",
        first_dense_key="first_k_dense_replace",
        dense_model_type=None,
        **extra,
    )


# GLM-4-MoE's attention is a Llama/Qwen2/Qwen3 attention when its rope covers the whole head and its q/k norms and
# q/k/v biases match (as moemerge-moe writes it from such a base): then an expert plus the shared MLP is that dense
# model. Real GLM-4.5 checkpoints rotate half of each head (partial_rotary_factor 0.5) and have no dense twin.
GLM4_MOE_TWINS = tuple(
    (
        dense_type,
        (
            ("rope_parameters.partial_rotary_factor", 0.5, 1.0),
            ("use_qk_norm", False, qk_norm),
            ("attention_bias", False, qkv_bias),
        ),
    )
    for dense_type, qk_norm, qkv_bias in (("llama", False, False), ("qwen2", False, True), ("qwen3", True, False))
)


GPT_OSS_MOE = MoeLayout(
    router="mlp.router.weight",
    router_bias="mlp.router.bias",
    router_kind="topk_softmax",
    expert_gate=None,
    expert_up=None,
    expert_down=None,
    expert_count_key="num_local_experts",
    experts_per_token_key="num_experts_per_tok",
    expert_intermediate_key="intermediate_size",
    fused=(
        FusedExperts(
            orientation="in_out_interleaved",
            extra=("mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias"),
            router="mlp.router.weight",
        ),
    ),
    dense_model_type=None,  # clamped SwiGLU with biases: no dense twin
)

ARCHITECTURES: tuple[Architecture, ...] = (
    # Llama-layout decoders: model.layers.N., model.embed_tokens, model.norm, lm_head (tied where the config says)
    _decoder("llama", "llama", "solar", "baichuan", "afmoe", "_afmoe_partial", model_class="LlamaForCausalLM"),
    _decoder("mistral", model_class="MistralForCausalLM"),
    _decoder("qwen2", model_class="Qwen2ForCausalLM"),
    _decoder("qwen3", model_class="Qwen3ForCausalLM"),
    _decoder("gemma", "gemma", "gemma2", "gemma3_text"),
    _decoder("cohere", "cohere", "cohere2"),
    _decoder("granite", "granite"),
    _decoder("olmo2", "olmo2", "olmo", "olmo3"),
    _decoder("apertus", "apertus", "arcee", "exaone4", "glm", "glm4", "helium", "smollm3", "ministral"),
    _decoder("phi3", "phi3", "phi3small", dense_mlp=None),  # fused gate_up_proj: not usable as an MoE expert
    _decoder("stablelm", "stablelm", "stablelm_epoch", final_norm=_biased_norm(), dense_mlp=None),
    _decoder("starcoder2", final_norm=_biased_norm(), dense_mlp=None),
    _decoder("phi", final_norm=_biased_norm("model.final_layernorm"), lm_head=("lm_head.weight", "lm_head.bias")),
    _decoder("lfm2", final_norm=("model.embedding_norm.weight",), dense_mlp=None),
    _decoder("granitemoehybrid", dense_mlp=None),
    _decoder(
        "internlm2",
        embeddings=("model.tok_embeddings.weight",),
        lm_head=("output.weight",),
        tied=(("output.weight", "model.tok_embeddings.weight"),),
        dense_mlp=None,
    ),
    # GPT-2-style and other `transformer.` roots
    _gpt("gpt2", "gpt2", "gpt_bigcode"),
    _gpt("jais", optional=("transformer.wpe.weight", "transformer.relative_pe.slopes")),
    _gpt("qwen", count="num_hidden_layers"),
    _gpt("exaone", count="num_layers"),
    _gpt("falcon", count="num_hidden_layers", embeddings=("transformer.word_embeddings.weight",)),
    _gpt(
        "phi-msft",
        embeddings=("transformer.embd.wte.weight",),
        final_norm=_biased_norm("lm_head.ln"),
        lm_head=("lm_head.linear.weight", "lm_head.linear.bias"),
        tied=(),
    ),
    Architecture(
        "mixformer-sequential",
        ("mixformer-sequential",),
        stacks=(Stack(("layers.{layer}.",), ("n_layer",), offset=1),),  # layers.0 embeds, layers.{n+1} is the head
        embeddings=("layers.0.wte.weight",),
        final_norm=(),
        lm_head=(),
        tied=(),
        dense_mlp=None,
    ),
    Architecture(
        "gpt_neox",
        ("gpt_neox",),
        stacks=(Stack(("gpt_neox.layers.{layer}.",)),),
        embeddings=("gpt_neox.embed_in.weight",),
        final_norm=_biased_norm("gpt_neox.final_layer_norm"),
        lm_head=("embed_out.weight",),
        tied=(("embed_out.weight", "gpt_neox.embed_in.weight"),),
        dense_mlp=None,
    ),
    Architecture(
        "chatglm",
        ("chatglm",),
        stacks=(Stack(("transformer.encoder.layers.{layer}.",), ("num_layers", "num_hidden_layers")),),
        embeddings=("transformer.embedding.word_embeddings.weight",),
        final_norm=("transformer.encoder.final_layernorm.weight",),
        lm_head=("transformer.output_layer.weight",),
        tied=(),
        optional=("transformer.rotary_pos_emb.inv_freq",),
        dense_mlp=None,
    ),
    Architecture(
        "mamba",
        ("mamba",),
        stacks=(Stack(("backbone.layers.{layer}.",)),),
        embeddings=("backbone.embeddings.weight",),
        final_norm=("backbone.norm_f.weight",),
        tied=(("lm_head.weight", "backbone.embeddings.weight"),),
        dense_mlp=None,
    ),
    # Encoders and encoder-decoders: the first stack is the one slices address
    _encoder("bert", roots=("", "bert")),
    _encoder("roberta", "roberta", "xlm-roberta", roots=("", "roberta")),
    _encoder(
        "distilbert",
        roots=("", "distilbert"),
        stack="transformer.layer.{layer}.",
        count_keys=("n_layers", "num_hidden_layers"),
    ),
    Architecture(
        "t5",
        ("t5",),
        stacks=(
            Stack(("decoder.block.{layer}.",), ("num_decoder_layers",)),
            Stack(("encoder.block.{layer}.",), ("num_layers",), name="encoder"),
        ),
        embeddings=("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
        final_norm=("decoder.final_layer_norm.weight", "encoder.final_layer_norm.weight"),
        tied=(("lm_head.weight", "shared.weight"),),
        dense_mlp=None,
    ),
    Architecture(
        "whisper",
        ("whisper",),
        stacks=(
            Stack(("model.decoder.layers.{layer}.",), ("decoder_layers",)),
            Stack(("model.encoder.layers.{layer}.",), ("encoder_layers",), name="encoder"),
        ),
        embeddings=("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"),
        final_norm=_biased_norm("model.decoder.layer_norm"),
        lm_head=("proj_out.weight",),
        tied=(("proj_out.weight", "model.decoder.embed_tokens.weight"),),
        dense_mlp=None,
    ),
    # Vision + text: the text decoder is the first stack
    _vision_language(
        "llava",
        "llava",
        "mistral3",
        "gemma3",
        "llava_next",
        text=("language_model.model.layers.{layer}.", "model.language_model.layers.{layer}."),
        vision=(
            "vision_tower.vision_model.encoder.layers.{layer}.",
            "vision_tower.encoder.layers.{layer}.",
            "vision_tower.transformer.layers.{layer}.",
            "model.vision_tower.vision_model.encoder.layers.{layer}.",
            "model.vision_tower.encoder.layers.{layer}.",
            "model.vision_tower.transformer.layers.{layer}.",
        ),
        dense_mlp=None,
    ),
    _vision_language(
        "qwen2_vl",
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen3_vl_moe",
        text=("model.layers.{layer}.", "model.language_model.layers.{layer}."),
        vision=("visual.blocks.{layer}.", "model.visual.blocks.{layer}."),
        text_count=("text_config.num_hidden_layers", "num_hidden_layers"),
        vision_count=("vision_config.depth",),
        text_roots=("model", "model.language_model"),
        head_roots=("lm_head",),
        dense_mlp=None,
    ),
    _vision_language(
        "llama4",
        text=("language_model.model.layers.{layer}.", "model.language_model.layers.{layer}."),
        vision=("vision_model.model.layers.{layer}.", "model.vision_model.model.layers.{layer}."),
        dense_mlp=None,
    ),
    # Mixtures of experts
    _decoder("mixtral", dense_mlp=None, moe=MIXTRAL_MOE, model_class="MixtralForCausalLM"),
    _decoder(
        "qwen2_moe",
        dense_mlp=None,
        moe=_qwen_moe("qwen2", shared=True, dense_bases=("qwen2",), recipe_names=("qwen2_moe", "qwen")),
        model_class="Qwen2MoeForCausalLM",
    ),
    _decoder(
        "qwen3_moe",
        dense_mlp=None,
        moe=_qwen_moe("qwen3", dense_bases=("qwen3",), recipe_names=("qwen3_moe", "qwen")),
        model_class="Qwen3MoeForCausalLM",
    ),
    _decoder("olmoe", dense_mlp=None, moe=_qwen_moe(None), model_class="OlmoeForCausalLM"),
    _decoder(
        "deepseek_v3",
        dense_mlp=None,
        moe=_deepseek_moe("sigmoid_group", "n_routed_experts"),
        model_class="DeepseekV3ForCausalLM",
    ),
    _decoder(
        "deepseek_v2",
        dense_mlp=None,
        moe=_deepseek_moe("softmax_group", "n_routed_experts"),
        model_class="DeepseekV2ForCausalLM",
    ),
    _decoder(
        "glm4_moe",
        dense_mlp=None,
        # mergekit-moe's DeepSeek output (remote code) is written as this native class: q/k/v biases hold a Qwen2
        # attention, q/k norms a Qwen3 one; no o_proj or MLP biases (a Llama with attention_bias is refused)
        moe=_deepseek_moe(
            "sigmoid_group",
            "n_routed_experts",
            dense_twins=GLM4_MOE_TWINS,
            dense_bases=("llama", "mistral", "qwen2", "qwen3"),
            recipe_names=("glm4_moe", "deepseek"),
            holds_biases=False,
            holds_sliding_window=False,
        ),
        model_class="Glm4MoeForCausalLM",
    ),
    _decoder("gpt_oss", dense_mlp=None, moe=GPT_OSS_MOE, model_class="GptOssForCausalLM"),
)

UNKNOWN = Architecture("unknown", (), stacks=(Stack(("*.layers.{layer}.",)),), dense_mlp=None)


def moe_outputs() -> tuple[Architecture, ...]:
    """The MoE families moemerge-moe can write (those built from dense bases), in table order."""
    return tuple(arch for arch in ARCHITECTURES if arch.moe is not None and arch.moe.dense_bases)


def expert_count_keys() -> tuple[str, ...]:
    """Every config key some family keeps its number of routed experts under (transformers aliases them)."""
    return tuple(dict.fromkeys(arch.moe.expert_count_key for arch in ARCHITECTURES if arch.moe is not None))


def find_architecture(model_type: str | None) -> Architecture | None:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    return None


def supported_model_types() -> list[str]:
    return [model_type for arch in ARCHITECTURES for model_type in arch.model_types]


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
            f"supported: {', '.join(supported_model_types())}"
        )
    return arch


# Model classes that name one architecture (mergekit's definitions list them together).
CLASS_ALIASES = {
    "LLaMaForCausalLM": "LlamaForCausalLM",
    "BertForMultipleChoice": "BertForSequenceClassification",
    "BertForTokenClassification": "BertForSequenceClassification",
}


@dataclass(frozen=True)
class ModelKind:
    """What must agree between the models of a dense merge unless --allow-crimes: config.json's model class
    (`architectures[0]`, aliases as one) and its `model_type`.

    mergekit compares the architecture definition it finds for the class (the model_type only tells apart
    definitions sharing a class, e.g. phi and phi-msft); comparing both refuses as well a checkpoint whose
    model_type was edited. The tokenizer plays no part.
    """

    model_class: str | None  # None when config.json lists no class: it then agrees with any class
    model_type: str | None

    def __str__(self) -> str:
        if self.model_class is None:
            return f"model_type {self.model_type}"
        return f"{self.model_class} ({self.model_type})"


def model_kind(config: dict) -> ModelKind:
    classes = config.get("architectures") or [None]
    model_class = CLASS_ALIASES.get(classes[0], classes[0]) if isinstance(classes[0], str) else None
    return ModelKind(model_class, config.get("model_type"))


def mixed_kinds(kinds: dict[str, ModelKind]) -> str | None:
    """`LlamaForCausalLM (llama) in a, b and MistralForCausalLM (mistral) in c` when the kinds differ, else None."""
    classes = {kind.model_class for kind in kinds.values() if kind.model_class is not None}
    if len(classes) <= 1 and len({kind.model_type for kind in kinds.values()}) <= 1:
        return None
    groups: dict[str, list[str]] = {}
    for model, kind in kinds.items():
        groups.setdefault(str(kind), []).append(model)
    return " and ".join(f"{label} in {', '.join(map(repr, models))}" for label, models in groups.items())


def layer_of(name: str) -> int | None:
    """Layer index of a `.layers.N.` tensor name (any architecture), or None."""
    match = LAYER_PATTERN.match(name)
    return int(match["layer"]) if match else None


def with_layer(name: str, layer: int) -> str:
    """The same `.layers.N.` tensor name in another layer."""
    match = LAYER_PATTERN.match(name)
    if not match:
        raise ValueError(f"{name} is not a per-layer tensor")
    return f"{match['prefix']}{layer}.{match['suffix']}"


def text_config(config: dict) -> dict:
    """The part of a config.json describing the text decoder (`text_config` of vision-language models)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) and "num_hidden_layers" not in config else config


def _config_value(config: dict, dotted: str, default: object) -> object:
    found = _lookup(config, dotted)
    return default if found is None else found[0][found[1]]


def _lookup(config: dict, dotted: str) -> tuple[dict, str] | None:
    *parents, key = dotted.split(".")
    section = config
    for parent in parents:
        section = section.get(parent)
        if not isinstance(section, dict):
            return None
    return (section, key) if key in section else None


def _raw_layer_count(config: dict, arch: Architecture, stack: Stack) -> tuple[str, object]:
    for key in stack.count_keys:
        found = _lookup(config, key)
        if found is not None:
            return key, found[0][found[1]]
    # Older vision-language configs keep the text depth at the top level, newer ones under text_config.
    bare = stack.count_keys[0].rsplit(".", 1)[-1]
    nested = _lookup(config, f"text_config.{bare}")
    if nested is not None and stack is arch.decoder:
        return f"text_config.{bare}", nested[0][nested[1]]
    raise MoemergeError(
        f"config.json has no {' or '.join(map(repr, stack.count_keys))}: cannot tell how many layers the model has"
    )


def layer_count(
    config: dict,
    arch: Architecture,
    tensor_names: Iterable[str] | None = None,
    *,
    label: str = "model",
    stack: Stack | None = None,
) -> int:
    """Depth of a stack (the decoder by default), checked: a whole number, and (given the tensor names) no more
    than the weights hold.

    Checked before any loop runs over the layers: a config saying 1e9 layers must fail at once, not loop for hours.
    """
    stack = stack or arch.decoder
    key, value = _raw_layer_count(config, arch, stack)
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 0:
        raise MoemergeError(f"{label}: config.json has {key} {value!r}, not a whole number of layers")
    count = int(value)
    if tensor_names is not None and stack is arch.decoder:
        present = {index for index in map(arch.layer_of, tensor_names) if index is not None}
        held = max(present) + 1 if present else 0
        if count > held:
            raise MoemergeError(
                f"{label}: config.json has {key} {count}, but the weights hold tensors for {held} layers"
            )
    return count


def layer_count_section(config: dict, arch: Architecture) -> dict:
    """The config dict that holds the decoder's depth (where per-layer lists such as layer_types sit too)."""
    for key in arch.decoder.count_keys:
        found = _lookup(config, key)
        if found is not None:
            return found[0]
    return text_config(config)


def set_layer_count(config: dict, arch: Architecture, count: int) -> None:
    """Write a new decoder depth under every count key the config has (in place)."""
    written = False
    for key in arch.decoder.count_keys:
        found = _lookup(config, key)
        if found is not None:
            found[0][found[1]] = count
            written = True
    if not written:
        section = text_config(config)
        section[arch.decoder.count_keys[0].rsplit(".", 1)[-1]] = count


TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")  # transformers 4.x reads these beside rope_scaling


def with_legacy_rope_keys(config: dict) -> dict:
    """A config with transformers 4.x's `rope_theta` / `rope_scaling` written beside transformers 5's
    `rope_parameters` (in place, also in text_config): 4.x reads only the legacy keys and otherwise falls back
    to the class's default rope base (a Mixtral from a Mistral base: 1e4 read as 1e6). `partial_rotary_factor`
    goes to the top level too, where 4.x reads it (GLM-4-MoE from a Llama base: 1.0, read as 4.x's default 0.5)."""
    sections = [config] + [value for key, value in config.items() if key == "text_config" and isinstance(value, dict)]
    for section in sections:
        parameters = section.get("rope_parameters")
        if not isinstance(parameters, dict) or "rope_theta" not in parameters:
            continue  # per-layer-type parameters (Gemma 3) or none: nothing 4.x could read from one key
        section["rope_theta"] = parameters["rope_theta"]
        if "partial_rotary_factor" in parameters:
            section["partial_rotary_factor"] = parameters["partial_rotary_factor"]
        rope_type = parameters.get("rope_type", "default")
        if rope_type != "default":
            scaling = {key: value for key, value in parameters.items() if key not in TOP_LEVEL_ROPE_KEYS}
            section["rope_scaling"] = {"type": rope_type, **scaling}
        else:
            section.setdefault("rope_scaling", None)
    return config
