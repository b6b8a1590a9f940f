"""The MoE config.json, derived from the base model's dense config (attention and rope settings kept)."""

from __future__ import annotations

from moemerge.architectures import with_legacy_rope_keys
from moemerge.moe.sources import MoeSources

# Keys that describe the source checkpoint, not the MoE, or that the MoE class does not read.
DROPPED_KEYS = ("architectures", "model_type", "_name_or_path", "transformers_version", "dtype", "torch_dtype")
DROPPED_FOR_MIXTRAL = ("attention_bias", "mlp_bias", "pretraining_tp")
# GLM-4-MoE attends to the whole context and has no per-layer attention types.
DROPPED_FOR_GLM4_MOE = (
    "mlp_bias",
    "pretraining_tp",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "qkv_bias",
)


def moe_config(sources: MoeSources, experts_per_token: int, norm_topk_prob: bool | None = None) -> dict:
    """Base config with model_type/architectures changed and the expert counts and sizes set."""
    target = sources.target
    moe = target.moe
    assert moe is not None
    config = {key: value for key, value in sources.base.config.items() if key not in DROPPED_KEYS}
    config["model_type"] = target.name
    assert target.model_class is not None, target.name
    config["architectures"] = [target.model_class]
    config[moe.expert_count_key] = len(sources.experts)
    config[moe.experts_per_token_key] = experts_per_token
    config[moe.expert_intermediate_key] = sources.expert_intermediate
    config["output_router_logits"] = False
    if target.name == "glm4_moe":
        _glm4_moe_keys(config, sources, norm_topk_prob)
    elif target.name == "mixtral":
        for key in DROPPED_FOR_MIXTRAL:
            config.pop(key, None)
        config.setdefault("sliding_window", None)
    else:
        # Qwen2-MoE checkpoints do not renormalise the top-k weights (and llama.cpp never does): keep the
        # family's default there; Qwen3-MoE checkpoints do renormalise. Every layer is sparse.
        config["norm_topk_prob"] = norm_topk_prob if norm_topk_prob is not None else target.name != "qwen2_moe"
        config["decoder_sparse_step"] = 1
        config["mlp_only_layers"] = []
    if moe.shared_intermediate_key and sources.shared_intermediate is not None:
        config[moe.shared_intermediate_key] = sources.shared_intermediate
    if moe.shared_count_key and sources.shared_intermediate is not None:  # expert-wide shared experts, padded
        config[moe.shared_count_key] = sources.shared_intermediate // sources.expert_intermediate
    if target.name == "qwen2_moe":
        config["qkv_bias"] = True  # Qwen2 attention always has q/k/v biases
    return with_legacy_rope_keys(config)


def _glm4_moe_keys(config: dict, sources: MoeSources, norm_topk_prob: bool | None) -> None:
    """mergekit-moe's DeepSeek output as GLM-4-MoE: sigmoid top-k over the routed experts (renormalised, unscaled,
    one group), the shared experts always added, every layer sparse; attention as the base's: rope over
    the whole head, q/k norms for a Qwen3 base, q/k/v biases for a Qwen2 base."""
    base_type = sources.base.config.get("model_type")
    for key in DROPPED_FOR_GLM4_MOE:
        config.pop(key, None)
    rope = dict(config.get("rope_parameters") or {})
    if "rope_theta" not in rope:
        rope.setdefault("rope_type", "default")
        rope["rope_theta"] = config.get("rope_theta", 10000.0)
    rope["partial_rotary_factor"] = 1.0  # GLM-4-MoE's own default rotates half of each head
    config["rope_parameters"] = rope
    config["use_qk_norm"] = base_type == "qwen3"
    config["attention_bias"] = base_type == "qwen2"
    config["first_k_dense_replace"] = 0
    config["n_group"] = 1
    config["topk_group"] = 1
    config["routed_scaling_factor"] = 1.0
    config["norm_topk_prob"] = True if norm_topk_prob is None else norm_topk_prob
    config["num_nextn_predict_layers"] = 0  # no multi-token-prediction layer
