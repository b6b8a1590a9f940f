"""Shared experts in `moemerge-moe`: mergekit's DeepSeek output written as GLM-4-MoE with any number of shared
experts, and Qwen2-MoE with several; each checked against a dense model that must give the same logits, then
split back (prune, dense extraction) and run by transformers."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import read_tensors
from moe_support import expert_entry
from split_fixtures import load, run_split
from transformers import AutoModelForCausalLM

from moemerge.toys import TOY_TEXT, make_toy_model

pytest_plugins = ("moe_fixtures",)

INPUT_IDS = torch.tensor([[5, 40, 77, 120, 9, 300, 18, 64]])
SHARED_DOWN = "model.layers.{}.mlp.shared_experts.down_proj.weight"


def assemble(run_moe, moe_recipe_file, recipe: dict, out) -> dict:
    result = run_moe(moe_recipe_file(recipe), out, "--quiet")
    assert result.exit_code == 0, result.output
    return json.loads((out / "config.json").read_text())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def generates(folder) -> None:
    tokens = load(folder).generate(INPUT_IDS[:, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 8)


def dense_with_mlp_sum(base, *donors, scales=None) -> torch.Tensor:
    """The base model with each layer's MLP replaced by Σ scale_d · (donor d's MLP at that layer): the function a
    MoE of those experts must compute (written here with transformers modules, independent of moemerge)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    mlps = [AutoModelForCausalLM.from_pretrained(donor, dtype=torch.float32).model.layers for donor in donors]
    scales = scales or [1.0] * len(donors)
    for index, layer in enumerate(model.model.layers):
        parts = [(layers[index].mlp, scale) for layers, scale in zip(mlps, scales, strict=True)]
        layer.mlp.forward = lambda x, parts=parts: sum(scale * mlp(x) for mlp, scale in parts)
    return logits(model)


@pytest.mark.parametrize(("family", "shared"), [("mistral", 2), ("qwen3", 3), ("qwen2", 1)])
def test_deepseek_output_of_identical_experts_is_the_base(
    moe_models, moe_recipe_file, run_moe, tmp_path, family, shared
):
    """Routed top-k weights renormalised (sum 1) at half strength + N always-on shared experts summing to half = the
    dense base, for Llama/Mistral attention, Qwen3's q/k norms and Qwen2's q/k/v biases alike."""
    base = moe_models[family]
    recipe = {
        "base_model": str(base),
        "architecture": "DeepSeek MoE",  # mergekit-moe's spelling of its output's name
        "gate_mode": "random",
        "dtype": "float32",
        "experts": [expert_entry(base, residual_scale=0.5) for _ in range(3)],
        "shared_experts": [expert_entry(base, residual_scale=0.5 / shared) for _ in range(shared)],
    }
    config = assemble(run_moe, moe_recipe_file, recipe, tmp_path / "moe")
    assert config["model_type"] == "glm4_moe" and config["n_shared_experts"] == shared
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert (config["use_qk_norm"], config["attention_bias"]) == (family == "qwen3", family == "qwen2")
    model = load(tmp_path / "moe")  # no missing or unexpected tensors
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    reference = dense_with_mlp_sum(base, base)
    torch.testing.assert_close(logits(model), reference, rtol=1e-5, atol=1e-5)
    generates(tmp_path / "moe")


def test_shared_experts_of_any_width_add_up(moe_models, moe_recipe_file, run_moe, tmp_path):
    """Two shared experts of widths 128 and 96 become one MLP of 2 x 128 (32 zero rows): MLP(x) = coder(x) + narrow(x)
    exactly; inferred as the DeepSeek output (mergekit-moe's choice for a Mistral base with a shared expert)."""
    base = moe_models["mistral"]
    narrow = make_toy_model(tmp_path / "narrow", "mistral", seed=5, intermediate_size=96, tokenizer=False)
    recipe = {
        "base_model": str(base),
        "gate_mode": "random",
        "dtype": "float32",
        "experts": [expert_entry(base, residual_scale=0.0) for _ in range(2)],  # routed part silenced
        "shared_experts": [expert_entry(moe_models["coder"]), expert_entry(narrow)],
    }
    config = assemble(run_moe, moe_recipe_file, recipe, tmp_path / "moe")
    assert config["model_type"] == "glm4_moe" and config["n_shared_experts"] == 2
    stored = read_tensors(tmp_path / "moe")
    assert stored[SHARED_DOWN.format(0)].shape == (64, 256)
    assert not stored[SHARED_DOWN.format(0)][:, 224:].any()
    expected = dense_with_mlp_sum(base, moe_models["coder"], narrow)
    torch.testing.assert_close(logits(load(tmp_path / "moe")), expected, rtol=1e-5, atol=1e-5)


def test_qwen2_moe_with_several_shared_experts_weighs_them_one(moe_models, moe_recipe_file, run_moe, tmp_path):
    """Qwen2-MoE's one shared MLP holds both experts; its gate row is zero (sigmoid 1/2) and the down projection is
    doubled, so the shared experts add their whole output, as the recipe says."""
    base = moe_models["qwen2"]
    recipe = {
        "base_model": str(base),
        "gate_mode": "random",
        "dtype": "float32",
        "norm_topk_prob": True,
        "experts": [expert_entry(base, residual_scale=0.5) for _ in range(3)],
        "shared_experts": [expert_entry(base, residual_scale=0.25), expert_entry(base, residual_scale=0.25)],
    }
    config = assemble(run_moe, moe_recipe_file, recipe, tmp_path / "moe")
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 2 * 128
    stored = read_tensors(tmp_path / "moe")
    assert not stored["model.layers.0.mlp.shared_expert_gate.weight"].any()
    torch.testing.assert_close(logits(load(tmp_path / "moe")), dense_with_mlp_sum(base, base), rtol=1e-5, atol=1e-5)


def test_qwen2_moe_prompted_shared_gate_keeps_its_weights(moe_models, moe_recipe_file, run_moe, tmp_path):
    """A shared expert routed by prompts keeps mergekit's gate (its prompt direction) and its own down projection."""
    base, shared = moe_models["qwen2"], moe_models["qwen2_ft1"]
    recipe = {
        "base_model": str(base),
        "gate_mode": "cheap_embed",
        "dtype": "float32",
        "experts_per_token": 1,
        "experts": [expert_entry(base, ["def add(a, b)"]), expert_entry(base, ["Once upon a time"])],
        "shared_experts": [expert_entry(shared, ["1 + 2 = 3"])],
    }
    assemble(run_moe, moe_recipe_file, recipe, tmp_path / "moe")
    stored, source = read_tensors(tmp_path / "moe"), read_tensors(shared)
    assert stored["model.layers.0.mlp.shared_expert_gate.weight"].abs().sum() > 0
    down = "model.layers.0.mlp.{}down_proj.weight"
    assert torch.equal(stored[down.format("shared_expert.")], source[down.format("")])
    # Router noise on the shared expert also makes its gate token-dependent: its weights are not doubled either.
    recipe.update(gate_mode="random", shared_experts=[expert_entry(shared, noise=0.1)])
    assemble(run_moe, moe_recipe_file, recipe, tmp_path / "noisy")
    stored = read_tensors(tmp_path / "noisy")
    assert stored["model.layers.0.mlp.shared_expert_gate.weight"].abs().sum() > 0
    assert torch.equal(stored[down.format("shared_expert.")], source[down.format("")])


def test_short_sliding_window_is_warned_about(moe_models, moe_recipe_file, tmp_path, caplog):
    from moemerge.config.moe_recipe import parse_moe_recipe
    from moemerge.moe.assemble import describe_recipe

    base = tmp_path / "windowed"
    shutil.copytree(moe_models["mistral"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    recipe = {
        "base_model": str(base),
        "architecture": "deepseek",
        "gate_mode": "random",
        "experts": [expert_entry(base)],
        "experts_per_token": 1,
        "shared_experts": [expert_entry(base)],
    }
    with caplog.at_level(logging.WARNING):
        assert "architecture: glm4_moe" in describe_recipe(parse_moe_recipe(recipe))
    assert "sliding window of 16 tokens" in caplog.text


@pytest.mark.parametrize(
    ("architecture", "shared", "expected"),
    [
        ("deepseek", [expert_entry("{coder}", ["def add"])], "shared_experts[0].positive_prompts: glm4_moe's shared"),
        ("deepseek", [], "shared_experts: architecture 'glm4_moe' needs at least one shared expert"),
        (
            "qwen2_moe",
            [expert_entry("{qwen2}", ["def add"]), expert_entry("{qwen2}", ["1 + 2"])],
            "qwen2_moe has one gate for all its shared experts",
        ),
    ],
)
def test_shared_expert_mistakes_name_the_key(
    moe_models, moe_recipe_file, run_moe, tmp_path, architecture, shared, expected
):
    base = moe_models["qwen2" if architecture == "qwen2_moe" else "mistral"]
    paths = {"coder": moe_models["coder"], "qwen2": moe_models["qwen2"]}
    recipe = {
        "base_model": str(base),
        "architecture": architecture,
        "gate_mode": "cheap_embed",
        "experts_per_token": 1,
        "experts": [expert_entry(base, ["def add"]), expert_entry(base, ["Once upon"])],
        "shared_experts": [{**entry, "source_model": entry["source_model"].format(**paths)} for entry in shared],
    }
    result = run_moe(moe_recipe_file(recipe), tmp_path / "out", "--quiet")
    assert result.exit_code != 0
    assert expected in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture
def deepseek_moe(moe_models, moe_recipe_file, run_moe, tmp_path):
    """coder/math/story routed, base + coder shared, top-1: a GLM-4-MoE from Mistral models."""
    recipe = {
        "base_model": str(moe_models["mistral"]),
        "architecture": "deepseek",
        "gate_mode": "random",
        "dtype": "float32",
        "experts_per_token": 1,
        "experts": [expert_entry(moe_models[name]) for name in ("coder", "math", "story")],
        "shared_experts": [expert_entry(moe_models["mistral"]), expert_entry(moe_models["coder"])],
    }
    assemble(run_moe, moe_recipe_file, recipe, tmp_path / "moe")
    return tmp_path / "moe"


def test_deepseek_output_splits_back_to_a_dense_llama(deepseek_moe, moe_models, tmp_path):
    """--expert 1: a Llama (the dense twin of this GLM-4-MoE) whose MLP is math + both shared experts, which is what
    the MoE computes when its router picks math (top-1 weight 1)."""
    result = run_split(deepseek_moe, tmp_path / "dense", "--expert", "1")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 3 * 128
    dense = load(tmp_path / "dense")
    base = moe_models["mistral"]
    expected = dense_with_mlp_sum(base, moe_models["math"], base, moe_models["coder"])
    torch.testing.assert_close(logits(dense), expected, rtol=1e-5, atol=1e-5)
    generates(tmp_path / "dense")


def test_deepseek_output_prunes_to_a_smaller_moe(deepseek_moe, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(TOY_TEXT * 2)
    result = run_split(deepseek_moe, tmp_path / "pruned", "--prune-to", "2", "--calibration", text, "--seq-len", "32")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["model_type"], config["n_routed_experts"], config["n_shared_experts"]) == ("glm4_moe", 2, 2)
    before, after = read_tensors(deepseek_moe), read_tensors(tmp_path / "pruned")
    assert torch.equal(after[SHARED_DOWN.format(2)], before[SHARED_DOWN.format(2)])
    generates(tmp_path / "pruned")


def test_qwen2_moe_with_several_shared_experts_splits_back(moe_models, moe_recipe_file, run_moe, tmp_path):
    """The zero shared gate is sigmoid 1/2 exactly; split stands it in by 0.5 (not 1.0), so the dense Qwen2 of expert 0
    is expert 0's MLP + both shared experts, as the MoE computes with top-1."""
    base, ft1, ft2 = moe_models["qwen2"], moe_models["qwen2_ft1"], moe_models["qwen2_ft2"]
    recipe = {
        "base_model": str(base),
        "gate_mode": "random",
        "dtype": "float32",
        "experts_per_token": 1,
        "experts": [expert_entry(ft1), expert_entry(ft2)],
        "shared_experts": [expert_entry(base), expert_entry(ft2)],
    }
    assemble(run_moe, moe_recipe_file, recipe, tmp_path / "moe")
    result = run_split(tmp_path / "moe", tmp_path / "dense", "--expert", "0")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "qwen2"
    expected = dense_with_mlp_sum(base, ft1, base, ft2)
    torch.testing.assert_close(logits(load(tmp_path / "dense")), expected, rtol=1e-5, atol=1e-5)
    generates(tmp_path / "dense")
