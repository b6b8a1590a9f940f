"""The MoE config.json, derived from the base model's dense config (attention and rope settings kept)."""

from __future__ import annotations

from moemerge.architectures import with_legacy_rope_keys
from moemerge.moe.sources import MoeSources

MODEL_CLASSES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# Keys that describe the source checkpoint, not the MoE, or that the MoE class does not read.
DROPPED_KEYS = ("architectures", "model_type", "_name_or_path", "transformers_version", "dtype", "torch_dtype")
DROPPED_FOR_MIXTRAL = ("attention_bias", "mlp_bias", "pretraining_tp")


def moe_config(sources: MoeSources, experts_per_token: int, norm_topk_prob: bool | None = None) -> dict:
    """Base config with model_type/architectures changed and the expert counts and sizes set."""
    target = sources.target
    moe = target.moe
    assert moe is not None
    config = {key: value for key, value in sources.base.config.items() if key not in DROPPED_KEYS}
    config["model_type"] = target.name
    config["architectures"] = [MODEL_CLASSES[target.name]]
    config[moe.expert_count_key] = len(sources.experts)
    config[moe.experts_per_token_key] = experts_per_token
    config[moe.expert_intermediate_key] = sources.expert_intermediate
    config["output_router_logits"] = False
    if target.name == "mixtral":
        for key in DROPPED_FOR_MIXTRAL:
            config.pop(key, None)
        config.setdefault("sliding_window", None)
    else:
        # Qwen2-MoE checkpoints do not renormalise the top-k weights (and llama.cpp never does): keep the
        # family's default there; Qwen3-MoE checkpoints do renormalise. Every layer is sparse.
        config["norm_topk_prob"] = norm_topk_prob if norm_topk_prob is not None else target.name != "qwen2_moe"
        config["decoder_sparse_step"] = 1
        config["mlp_only_layers"] = []
    if moe.shared_intermediate_key:
        config[moe.shared_intermediate_key] = sources.shared_intermediate
    if target.name == "qwen2_moe":
        config["qkv_bias"] = True  # Qwen2 attention always has q/k/v biases
    return with_legacy_rope_keys(config)
