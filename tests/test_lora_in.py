"""`base+adapter` references: merging a LoRA into its base while tensors stream equals peft's merge_and_unload."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from conftest import read_tensors
from lora_fixtures import edit_adapter_config, merged_with_peft

from moemerge.errors import MoemergeError
from moemerge.io.loader import LazyModel


def passthrough(model: str) -> dict:
    return {"merge_method": "passthrough", "models": [{"model": model}], "dtype": "float32"}


@pytest.mark.parametrize("adapter", ["plain", "full", "rslora", "bias"])
def test_base_plus_lora_equals_peft_merge_and_unload(lora_models, write_recipe, run_yaml, tmp_path, adapter):
    base, folder = lora_models["base"], lora_models[adapter]
    result = run_yaml(write_recipe(passthrough(f"{base}+{folder}")), tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    merged, reference, original = read_tensors(tmp_path / "out"), merged_with_peft(base, folder), read_tensors(base)
    assert set(merged) == set(original)
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(tensor, original[name])
    expected = {"plain": 12, "rslora": 12, "full": 4 * 7 + 2, "bias": 4 * 4}[adapter]  # 4 layers × targets
    assert changed == expected


def test_lora_rows_and_slices_match_the_whole_tensor(lora_models):
    model = LazyModel.open(f"{lora_models['base']}+{lora_models['full']}")
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        whole = model.read(name)
        torch.testing.assert_close(model.read(name, rows=(3, 9)), whole[3:9])
        torch.testing.assert_close(model.read_slice(name, 5), whole[5])


def test_linear_of_base_and_base_plus_lora_is_half_the_update(lora_models, write_recipe, run_yaml, tmp_path):
    base, adapter = lora_models["base"], lora_models["plain"]
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(base), "parameters": {"weight": 1.0}},
            {"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
    }
    assert run_yaml(write_recipe(recipe), tmp_path / "out", "--quiet").exit_code == 0
    merged, original, reference = read_tensors(tmp_path / "out"), read_tensors(base), merged_with_peft(base, adapter)
    name = "model.layers.2.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], (original[name] + reference[name]) / 2)


def _broken_copy(source, tmp_path, **changes):
    folder = tmp_path / "adapter"
    shutil.copytree(source, folder)
    return edit_adapter_config(folder, **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"r": 16}, "rank 4 but adapter_config.json says 16"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ],
)
def test_unsupported_adapters_fail_in_one_line(lora_models, write_recipe, run_yaml, tmp_path, changes, message):
    adapter = _broken_copy(lora_models["plain"], tmp_path, **changes)
    result = run_yaml(write_recipe(passthrough(f"{lora_models['base']}+{adapter}")), tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_modules_to_save_of_another_shape_names_the_key(lora_models, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _broken_copy(lora_models["full"], tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.lm_head.weight"] = torch.zeros(400, 64)  # a resized vocabulary
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(MoemergeError, match=r"'base_model.model.lm_head.weight' is a modules_to_save tensor of shape"):
        LazyModel.open(f"{lora_models['base']}+{adapter}")


def test_dora_magnitude_and_unknown_target_name_the_key(lora_models, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _broken_copy(lora_models["plain"], tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.mlp.nonexistent.lora_A.weight"] = torch.zeros(4, 64)
    weights["base_model.model.model.layers.0.mlp.nonexistent.lora_B.weight"] = torch.zeros(64, 4)
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(MoemergeError, match=r"targets 'model.layers.0.mlp.nonexistent.weight', but the base lacks it"):
        LazyModel.open(f"{lora_models['base']}+{adapter}")
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(MoemergeError, match="DoRA"):
        LazyModel.open(f"{lora_models['base']}+{adapter}")


def test_missing_adapter_folder_fails_in_one_line(lora_models, write_recipe, run_yaml, tmp_path):
    result = run_yaml(write_recipe(passthrough(f"{lora_models['base']}+{tmp_path / 'nowhere'}")), tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "LoRA adapter" in result.stderr and "not found" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_yaml(write_recipe(passthrough(f"{lora_models['base']}+{tmp_path / 'empty'}")), tmp_path / "out")
    assert result.exit_code == 1 and "no adapter_config.json" in result.stderr


def test_adapter_in_bin_format_is_read_weights_only(lora_models, tmp_path):
    from safetensors.torch import load_file

    adapter = _broken_copy(lora_models["plain"], tmp_path)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    via_bin = LazyModel.open(f"{lora_models['base']}+{adapter}")
    via_safetensors = LazyModel.open(f"{lora_models['base']}+{lora_models['plain']}")
    name = "model.layers.0.self_attn.v_proj.weight"
    torch.testing.assert_close(via_bin.read(name), via_safetensors.read(name))


def test_moe_base_and_expert_as_base_plus_lora(toy_models, tmp_path):
    from click.testing import CliRunner
    from lora_fixtures import make_peft_adapter

    from moemerge.cli.moe_command import main

    base = toy_models["base"]
    adapter = make_peft_adapter(base, tmp_path / "adapter", seed=5, target_modules=["q_proj", "down_proj"])
    recipe = {
        "base_model": f"{base}+{adapter}",
        "gate_mode": "random",
        "dtype": "float32",
        "experts": [{"source_model": f"{base}+{adapter}"}, {"source_model": str(base)}],
    }
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, [str(tmp_path / "moe.yml"), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    merged, reference, original = read_tensors(tmp_path / "out"), merged_with_peft(base, adapter), read_tensors(base)
    for layer in range(4):
        attention = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(merged[attention], reference[attention], rtol=1e-5, atol=1e-6)
        down, expert = f"model.layers.{layer}.mlp.down_proj.weight", f"model.layers.{layer}.block_sparse_moe.experts"
        torch.testing.assert_close(merged[f"{expert}.0.w2.weight"], reference[down], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[f"{expert}.1.w2.weight"], original[down])


def test_hidden_gates_of_base_plus_lora_use_the_adapted_base(toy_models, tmp_path):
    from click.testing import CliRunner
    from lora_fixtures import make_peft_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moemerge.cli.moe_command import main

    base = toy_models["base"]
    adapter = make_peft_adapter(base, tmp_path / "adapter", seed=6, target_modules=["q_proj", "v_proj", "up_proj"])
    folded = tmp_path / "folded"  # the same base with the adapter merged by peft, as a plain folder
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(folded)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, folded / name)
    routers = []
    for reference in (f"{base}+{adapter}", str(folded)):
        experts = [
            {"source_model": str(toy_models[n]), "positive_prompts": [p]}
            for n, p in (("coder", "def add"), ("story", "Once upon"))
        ]
        recipe = {"base_model": reference, "gate_mode": "hidden", "dtype": "float32", "experts": experts}
        (tmp_path / "moe.yml").write_text(yaml.safe_dump(recipe))
        out = tmp_path / f"out{len(routers)}"
        result = CliRunner().invoke(main, [str(tmp_path / "moe.yml"), str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        routers.append(read_tensors(out)["model.layers.2.block_sparse_moe.gate.weight"])
    torch.testing.assert_close(routers[0], routers[1], rtol=1e-4, atol=1e-5)


def test_low_rank_delta_formula_plain_and_transposed():
    from moemerge.lora.adapter import LowRankDelta

    generator = torch.Generator().manual_seed(0)
    lora_a, lora_b = torch.randn(3, 5, generator=generator), torch.randn(7, 3, generator=generator)
    plain = LowRankDelta(lora_a, lora_b, scale=0.5, transposed=False)
    base = torch.randn(7, 5, generator=generator)
    torch.testing.assert_close(plain.apply(base, None), base + 0.5 * lora_b @ lora_a)
    torch.testing.assert_close(plain.apply(base[2:4], (2, 4)), (base + 0.5 * lora_b @ lora_a)[2:4])
    flipped = LowRankDelta(lora_a, lora_b, scale=2.0, transposed=True)  # fan_in_fan_out / embedding: (B·A)ᵀ
    base_t = torch.randn(5, 7, generator=generator)
    torch.testing.assert_close(flipped.apply(base_t, None), base_t + 2.0 * (lora_b @ lora_a).T)
    torch.testing.assert_close(flipped.apply(base_t[1:3], (1, 3)), (base_t + 2.0 * (lora_b @ lora_a).T)[1:3])
