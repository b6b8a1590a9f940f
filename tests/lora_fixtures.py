"""PEFT LoRA adapters built with peft on toy models (B randomised, so the adapters change something)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moemerge.toys import make_toy_model


def make_peft_adapter(base: Path, folder: Path, seed: int = 0, **lora_options) -> Path:
    """A peft LoRA on `base` with random A and B (peft starts B at zero), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora_options}
    peft_model = get_peft_model(model, LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(folder)
    return folder


def merged_with_peft(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The reference: peft's merge_and_unload() state dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


def edit_adapter_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama base with biased attention, its fine-tune, and LoRA adapters of several kinds."""
    root = tmp_path_factory.mktemp("lora-models")
    base = make_toy_model(root / "base", "llama", seed=20, attention_bias=True, tie_word_embeddings=False)
    models = {"base": base}
    models["finetune"] = make_toy_model(
        root / "finetune", "llama", seed=21, base=base, delta_scale=0.05, attention_bias=True, tie_word_embeddings=False
    )
    models["plain"] = make_peft_adapter(base, root / "plain", seed=1)
    models["full"] = make_peft_adapter(
        base,
        root / "full",
        seed=2,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 32},
    )
    models["bias"] = make_peft_adapter(base, root / "bias", seed=4, target_modules=["q_proj", "v_proj"], lora_bias=True)
    models["rslora"] = make_peft_adapter(base, root / "rslora", seed=3, use_rslora=True, r=8, lora_alpha=4)
    return models
