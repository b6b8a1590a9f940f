"""Tiny seeded models of every family transformers can build offline, for the architecture-table tests.

Each entry is the config.json `model_type`, the auto class that builds it and the config keys that
make it tiny (2 decoder layers, hidden 32). Families transformers only runs as remote code are
listed in REMOTE_CODE_ONLY: the table covers them from their published tensor names, untested here.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(TEXT, moe_intermediate_size=16, num_experts_per_tok=2)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
MROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))
QWEN_VISION = dict(depth=2, hidden_size=32, embed_dim=32, num_heads=4, out_hidden_size=32, intermediate_size=64)
GPT = dict(
    n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
CAUSAL, VISION_TEXT, BARE = "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

FAMILIES: dict[str, tuple[str, dict]] = {
    **{
        name: (CAUSAL, TEXT)
        for name in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "cohere",
            "cohere2",
            "granite",
            "olmo2",
            "apertus",
            "arcee",
            "exaone4",
            "glm4",
            "phi3",
            "starcoder2",
            "phi",
            "lfm2",
        )
    },  # fmt: skip
    "stablelm": (CAUSAL, dict(TEXT, num_key_value_heads=4)),
    "gpt2": (CAUSAL, GPT),
    "gpt_bigcode": (CAUSAL, GPT),
    "falcon": (CAUSAL, dict({k: v for k, v in TEXT.items() if k != "head_dim"}, new_decoder_architecture=True)),
    "gpt_neox": (CAUSAL, dict(TEXT, rotary_pct=1.0)),
    "mamba": (
        CAUSAL,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            vocab_size=128,
            state_size=4,
            expand=2,
            time_step_rank=4,
            pad_token_id=0,
        ),
    ),  # fmt: skip
    "bert": (BARE, dict(TEXT, type_vocab_size=2)),
    "roberta": (BARE, dict(TEXT, type_vocab_size=2, pad_token_id=1)),
    "distilbert": (BARE, dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, pad_token_id=0)),
    "t5": (
        "AutoModelForSeq2SeqLM",
        dict(
            vocab_size=128,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
    ),  # fmt: skip
    "whisper": (
        "AutoModelForSpeechSeq2Seq",
        dict(
            vocab_size=128,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            decoder_start_token_id=1,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),  # fmt: skip
    "llava": (VISION_TEXT, dict(text_config=dict(TEXT, model_type="llama"), vision_config=VISION, image_token_id=3)),
    "mistral3": (
        VISION_TEXT,
        dict(text_config=dict(TEXT, model_type="mistral"), vision_config=dict(VISION, head_dim=8), image_token_id=3),
    ),  # fmt: skip
    "gemma3": (
        VISION_TEXT,
        dict(
            text_config=dict(TEXT, model_type="gemma3_text"),
            vision_config=VISION,
            mm_tokens_per_image=4,
            image_token_id=3,
        ),
    ),  # fmt: skip
    "qwen2_vl": (
        VISION_TEXT,
        dict(
            text_config=dict(TEXT, **MROPE, model_type="qwen2_vl_text"),
            vision_config=QWEN_VISION,
            image_token_id=3,
            video_token_id=4,
        ),
    ),  # fmt: skip
    "qwen2_5_vl": (
        VISION_TEXT,
        dict(
            text_config=dict(TEXT, **MROPE, model_type="qwen2_5_vl_text"),
            vision_config=dict(QWEN_VISION, out_hidden_size=32, fullatt_block_indexes=[1]),
            image_token_id=3,
            video_token_id=4,
        ),
    ),  # fmt: skip
    "qwen3_vl": (
        VISION_TEXT,
        dict(
            text_config=dict(TEXT, model_type="qwen3_vl_text"),
            vision_config=dict(QWEN_VISION, deepstack_visual_indexes=[1]),
            image_token_id=3,
            video_token_id=4,
        ),
    ),  # fmt: skip
    "llama4": (
        VISION_TEXT,
        dict(
            text_config=dict(
                MOE, model_type="llama4_text", num_local_experts=2, intermediate_size_mlp=64, num_experts_per_tok=1
            ),
            vision_config=dict(VISION, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32),
            image_token_index=3,
        ),
    ),  # fmt: skip
    "mixtral": (CAUSAL, dict(MOE, num_local_experts=4)),
    "qwen2_moe": (CAUSAL, dict(MOE, num_experts=4, shared_expert_intermediate_size=32)),
    "qwen3_moe": (CAUSAL, dict(MOE, num_experts=4)),
    "olmoe": (CAUSAL, dict(MOE, num_experts=4)),
    "deepseek_v2": (
        CAUSAL,
        dict(
            MOE | MLA,
            n_routed_experts=4,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            topk_method="group_limited_greedy",
        ),
    ),  # fmt: skip
    "deepseek_v3": (
        CAUSAL,
        dict(MOE | MLA, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1),
    ),  # fmt: skip
    "glm4_moe": (
        CAUSAL,
        dict(
            MOE,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            partial_rotary_factor=0.5,
        ),
    ),  # fmt: skip
    "gpt_oss": (CAUSAL, dict(MOE, num_local_experts=4, intermediate_size=16, layer_types=None)),
}

# model_type → why the test cannot build it (transformers 5.24 has no class for it: remote code on the Hub)
REMOTE_CODE_ONLY = {
    name: "remote code only"
    for name in (
        "baichuan", "chatglm", "internlm2", "jais", "qwen", "exaone", "phi-msft", "mixformer-sequential",
        "phi3small", "solar", "stablelm_epoch", "_afmoe_partial",
    )
}  # fmt: skip
# Built by transformers, but slowly here: constructing a tiny AFMoE waits ~13 s (a Hub kernel lookup offline).
SLOW_TO_BUILD = {"afmoe": "building waits on a Hub kernel lookup"}


def build_family(folder: Path, model_type: str, seed: int) -> Path:
    """save_pretrained a tiny random model of the family into `folder` (same seed, same weights)."""
    import transformers

    auto_class, fields = FAMILIES[model_type]
    config = transformers.CONFIG_MAPPING[model_type](**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_config(config)
    model.save_pretrained(folder)
    return folder


def load_family(folder: Path, model_type: str):
    """The folder loaded with the family's auto class; returns (model, loading info)."""
    import transformers

    auto_class, _ = FAMILIES[model_type]
    return getattr(transformers, auto_class).from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
