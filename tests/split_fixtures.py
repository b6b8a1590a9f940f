"""Session fixtures for the moemerge-split tests: generated MoE models (built once) and helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from moemerge.toys import TOY_TEXT, make_toy_model

MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2)
# norm_topk_prob: renormalised top-k weights, so pruning keeps surviving tokens' weights exactly.
QWEN2_MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    norm_topk_prob=True,
)
ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"
W = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a folder, read with safetensors directly (independent of moemerge's loader)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def rewrite_tensors(folder: Path, edit) -> None:
    """Apply `edit(tensors) -> tensors` to a single-file safetensors model in place."""
    path = folder / "model.safetensors"
    tensors = edit(read_tensors(folder))
    path.unlink()
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _dead_expert_three(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Router row 3 = mean of rows 0..2: with top-1 its logit is never the strict maximum, so it is never picked."""
    for layer in range(4):
        router = tensors[ROUTER.format(layer)]
        router[3] = router[:3].mean(dim=0)
    return tensors


def _zero_routers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for layer in range(4):
        tensors[ROUTER.format(layer)].zero_()
    return tensors


DEEPSEEK_V3 = dict(
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)
# intermediate 24: gate_up is [E, 64, 48], so a transposed or de-interleaved read cannot pass by accident
GPT_OSS = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, sliding_window=8)


def _seeded_biases(*suffixes: str, seed: int, scale: float):
    """An edit giving every tensor ending in one of `suffixes` seeded values (transformers initialises them to 0)."""

    def edit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        for name in sorted(tensors):
            if name.endswith(suffixes):
                tensors[name] = torch.randn(tensors[name].shape, generator=generator) * scale
        return tensors

    return edit


def _fused_copy(source: Path, target: Path) -> Path:
    """The same model saved from transformers' in-memory (fused v5) state_dict with safetensors directly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="session")
def split_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mixtral (4 experts, top-2) in both layouts, a top-1 Mixtral whose expert 3 is never routed, an
    all-experts Mixtral with a zero router (uniform weights), Qwen2-MoE with a shared expert, Qwen3-MoE, OLMoE."""
    root = tmp_path_factory.mktemp("split-models")
    models = {"mixtral": make_toy_model(root / "mixtral", "mixtral", seed=40, **MIXTRAL)}
    models["mixtral_fused"] = _fused_copy(models["mixtral"], root / "mixtral-fused")
    dead = make_toy_model(root / "mixtral-dead", "mixtral", seed=41, num_local_experts=4, num_experts_per_tok=1)
    rewrite_tensors(dead, _dead_expert_three)
    models["mixtral_dead"] = dead
    uniform = make_toy_model(root / "mixtral-uniform", "mixtral", seed=42, num_local_experts=4, num_experts_per_tok=4)
    rewrite_tensors(uniform, _zero_routers)
    models["mixtral_uniform"] = uniform
    models["qwen2_moe"] = make_toy_model(root / "qwen2-moe", "qwen2_moe", seed=43, **QWEN2_MOE)
    models["qwen3_moe"] = make_toy_model(
        root / "qwen3-moe", "qwen3_moe", seed=44, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    )
    models["olmoe"] = make_toy_model(root / "olmoe", "olmoe", seed=45, num_experts=4, num_experts_per_tok=2)
    models["llama"] = make_toy_model(root / "llama", "llama", seed=46)
    models["deepseek_v3"] = make_toy_model(root / "deepseek-v3", "deepseek_v3", seed=47, **DEEPSEEK_V3)
    # a score-correction bias large enough to change choices, and which group wins
    rewrite_tensors(models["deepseek_v3"], _seeded_biases("e_score_correction_bias", seed=48, scale=0.02))
    models["gpt_oss"] = make_toy_model(root / "gpt-oss", "gpt_oss", seed=49, **GPT_OSS)
    rewrite_tensors(models["gpt_oss"], _seeded_biases("proj_bias", seed=50, scale=0.5))
    rewrite_tensors(models["gpt_oss"], _seeded_biases("router.bias", seed=51, scale=0.05))
    calibration = root / "calibration.txt"
    calibration.write_text((TOY_TEXT + "\n") * 3)
    models["calibration"] = calibration
    return models


def run_split(*args: object):
    """Run `moemerge-split` in-process; returns click's Result."""
    from moemerge.cli.split_command import main

    return CliRunner().invoke(main, [str(arg) for arg in args] + ["--quiet"])


def load(folder: Path):
    """The model loaded with transformers, failing on any missing or unexpected tensor."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def generates(folder: Path) -> list[int]:
    model = load(folder)
    prompt = torch.tensor([[5, 17, 42, 99]])
    tokens = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert tokens.shape == (1, 8)
    return tokens[0].tolist()


@pytest.fixture(scope="session")
def calibrated_prune(split_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One calibrated `--prune-to 2 --report` run on the Mixtral: `pruned/`, `usage.png` and the `usage.json` that
    later runs reuse with `--usage` instead of calibrating again."""
    root = tmp_path_factory.mktemp("calibrated-prune")
    result = run_split(split_models["mixtral"], root / "pruned", "--prune-to", 2,
                       "--calibration", split_models["calibration"], "--report", root / "usage.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    return root
