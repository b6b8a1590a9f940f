"""End to end through `moemerge-yaml` on generated Llama and Mistral models, checked against direct formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import read_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

Q_PROJ = "model.layers.{}.self_attn.q_proj.weight"
UP_PROJ = "model.layers.{}.mlp.up_proj.weight"


def generates(folder) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tokenizer("merge the models", return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokens.shape[1] == inputs.input_ids.shape[1] + 4
    return tokens[0].tolist()


def test_linear_equals_weighted_average_and_loads(toy_models, write_recipe, run_yaml, tmp_path):
    weights = {"coder": 0.5, "math": 0.3, "story": 0.2}
    recipe = write_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": str(toy_models[n]), "parameters": {"weight": w}} for n, w in weights.items()],
            "parameters": {"normalize": False},
        }
    )
    result = run_yaml(recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    merged = read_tensors(tmp_path / "out")
    inputs = {name: read_tensors(toy_models[name]) for name in weights}
    assert set(merged) == set(inputs["coder"])
    for name, tensor in merged.items():
        expected = sum(w * inputs[m][name] for m, w in weights.items())
        assert tensor.shape == inputs["coder"][name].shape and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)
    generates(tmp_path / "out")


def test_task_arithmetic_from_bin_inputs_matches_formula(toy_models, write_recipe, run_yaml, tmp_path):
    recipe = write_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(toy_models["base"]),
            "models": [
                {"model": str(toy_models["coder_bin"]), "parameters": {"weight": 1.0}},
                {"model": str(toy_models["math"]), "parameters": {"weight": 0.5}},
            ],
            "parameters": {"lambda": 0.8},
        }
    )
    assert run_yaml(recipe, tmp_path / "out", "--quiet").exit_code == 0
    merged = read_tensors(tmp_path / "out")
    base, coder, maths = (read_tensors(toy_models[n]) for n in ("base", "coder_bin", "math"))
    for name in (Q_PROJ.format(2), "model.embed_tokens.weight", "lm_head.weight"):
        expected = base[name] + 0.8 * (1.0 * (coder[name] - base[name]) + 0.5 * (maths[name] - base[name]))
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def _ties_reference(base, deltas, weights, density):
    """TIES written out with a full sort, independent of moemerge.methods."""
    kept = []
    for delta in deltas:
        k = int(density * delta.numel())
        order = torch.argsort(delta.abs().flatten(), descending=True, stable=True)
        mask = torch.zeros(delta.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        kept.append(delta * mask.view_as(delta))
    weighted = torch.stack([w * d for w, d in zip(weights, kept, strict=True)])
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == elected
    divisor = (torch.tensor(weights).view(-1, *[1] * base.dim()) * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + (weighted * agree).sum(0) / divisor


def test_ties_on_mistral_matches_reference_and_generates(toy_models, write_recipe, run_yaml, tmp_path):
    recipe = write_recipe(
        {
            "merge_method": "ties",
            "base_model": str(toy_models["mistral_base"]),
            "models": [
                {"model": str(toy_models["mistral_ft"]), "parameters": {"weight": 0.7, "density": 0.4}},
                {"model": str(toy_models["mistral_base"]), "parameters": {"weight": 0.3, "density": 0.4}},
            ],
        }
    )
    assert run_yaml(recipe, tmp_path / "out", "--quiet").exit_code == 0
    merged = read_tensors(tmp_path / "out")
    base, tuned = read_tensors(toy_models["mistral_base"]), read_tensors(toy_models["mistral_ft"])
    for name in (Q_PROJ.format(1), UP_PROJ.format(3)):
        expected = _ties_reference(base[name], [tuned[name] - base[name]], [0.7], 0.4)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mistral"
    generates(tmp_path / "out")


def _slerp_reference(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    a, b = v0.double().flatten(), v1.double().flatten()
    dot = float((a / a.norm()) @ (b / b.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    theta = math.acos(dot)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (s0 * v0.double() + s1 * v1.double()).float()


def test_slerp_gradients_and_filters_pick_t_per_layer_and_tensor(toy_models, write_recipe, run_yaml, tmp_path):
    coder, maths = str(toy_models["coder"]), str(toy_models["math"])
    recipe = write_recipe(
        {
            "merge_method": "slerp",
            "base_model": coder,
            "slices": [{"sources": [{"model": coder, "layer_range": [0, 4]}, {"model": maths, "layer_range": [0, 4]}]}],
            "parameters": {
                "t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.3}]
            },
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }
    )
    assert run_yaml(recipe, tmp_path / "out", "--quiet").exit_code == 0
    merged = read_tensors(tmp_path / "out")
    a, b = read_tensors(toy_models["coder"]), read_tensors(toy_models["math"])
    assert all(tensor.dtype == torch.bfloat16 for tensor in merged.values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    # t = layer/3 for attention, 1 - layer/3 for MLP, 0.3 elsewhere
    for layer in range(4):
        for template, t in ((Q_PROJ, layer / 3), (UP_PROJ, 1 - layer / 3)):
            name = template.format(layer)
            expected = _slerp_reference(a[name], b[name], t).to(torch.bfloat16)
            torch.testing.assert_close(merged[name].float(), expected.float(), rtol=1e-2, atol=1e-3)
    assert torch.equal(merged[Q_PROJ.format(0)], a[Q_PROJ.format(0)].to(torch.bfloat16))
    name = "model.layers.2.input_layernorm.weight"
    torch.testing.assert_close(merged[name].float(), _slerp_reference(a[name], b[name], 0.3), rtol=1e-2, atol=1e-2)
    generates(tmp_path / "out")


def test_passthrough_slices_stack_and_renumber_layers(toy_models, write_recipe, run_yaml, tmp_path):
    coder, story = str(toy_models["coder"]), str(toy_models["story"])
    recipe = write_recipe(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": coder, "layer_range": [0, 3]}]},
                {"sources": [{"model": story, "layer_range": [1, 4]}]},
            ],
            "dtype": "bfloat16",
        }
    )
    assert run_yaml(recipe, tmp_path / "out", "--quiet").exit_code == 0
    merged = read_tensors(tmp_path / "out")
    a, b = read_tensors(toy_models["coder"]), read_tensors(toy_models["story"])
    for out_layer, (source, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        assert torch.equal(merged[Q_PROJ.format(out_layer)], source[Q_PROJ.format(layer)].to(torch.bfloat16))
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"].to(torch.bfloat16))
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"].to(torch.bfloat16))
    assert not any(".layers.6." in name for name in merged)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    generates(tmp_path / "out")


def test_passthrough_scale_parameter(toy_models, write_recipe, run_yaml, tmp_path):
    coder = str(toy_models["coder"])
    recipe = write_recipe(
        {
            "merge_method": "passthrough",
            "slices": [
                {
                    "sources": [
                        {
                            "model": coder,
                            "layer_range": [0, 4],
                            "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                        }
                    ]
                }
            ],
        }
    )
    assert run_yaml(recipe, tmp_path / "out", "--quiet").exit_code == 0
    merged, a = read_tensors(tmp_path / "out"), read_tensors(toy_models["coder"])
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(merged[name], 0.5 * a[name])
    assert torch.equal(merged[Q_PROJ.format(1)], a[Q_PROJ.format(1)])


def _dare_recipe(toy_models, write_recipe, name):
    return write_recipe(
        {
            "merge_method": "dare_ties",
            "base_model": str(toy_models["base"]),
            "models": [
                {"model": str(toy_models["coder"]), "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(toy_models["math"]), "parameters": {"weight": 0.4, "density": 0.5}},
            ],
        },
        name,
    )


def test_dare_is_byte_identical_for_a_seed_and_differs_across_seeds(toy_models, write_recipe, run_yaml, tmp_path):
    recipe = _dare_recipe(toy_models, write_recipe, "dare.yml")
    for out, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert run_yaml(recipe, tmp_path / out, "--random-seed", seed, "--quiet").exit_code == 0
    shard = "model-00001-of-00001.safetensors"
    first, second, third = ((tmp_path / o / shard).read_bytes() for o in "abc")
    assert first == second
    assert first != third


def test_vocab_size_mismatch_keeps_base_rows_with_a_warning(toy_models, write_recipe, run_yaml, tmp_path, caplog):
    recipe = write_recipe(
        {
            "merge_method": "linear",
            "base_model": str(toy_models["base"]),
            "models": [
                {"model": str(toy_models["base"]), "parameters": {"weight": 0.5}},
                {"model": str(toy_models["big_vocab"]), "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
        }
    )
    result = run_yaml(recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert "model.embed_tokens.weight" in caplog.text and "vocab sizes differ" in caplog.text
    merged = read_tensors(tmp_path / "out")
    base, big = read_tensors(toy_models["base"]), read_tensors(toy_models["big_vocab"])
    embed = "model.embed_tokens.weight"
    assert merged[embed].shape == base[embed].shape
    torch.testing.assert_close(merged[embed], 0.5 * base[embed] + 0.5 * big[embed][:384])


def test_small_shards_index_and_folder_extras(toy_models, write_recipe, run_yaml, tmp_path):
    text = (
        "# my recipe\nmerge_method: linear\nmodels:\n"
        f"  - model: {toy_models['coder']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {toy_models['math']}\n    parameters: {{weight: 1}}\n"
    )
    out = tmp_path / "out"
    assert run_yaml(write_recipe(text), out, "--out-shard-size", "200K", "--quiet").exit_code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[-1].name.endswith(f"-of-{len(shards):05d}.safetensors")
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size < 200_000 + 100_000 for s in shards)  # one 98 KB embedding may sit alone
    assert (out / "moemerge_config.yml").read_text() == text
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == []  # local folders are no hub ids (mergekit writes [] too); the text names them
    assert f"- `{toy_models['coder']}` (local folder)" in card and f"- `{toy_models['math']}` (local folder)" in card
    assert front["tags"] == ["merge", "moemerge"] and front["library_name"] == "transformers"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    generates(out)
    assert run_yaml(write_recipe(text), tmp_path / "bare", "--no-copy-tokenizer", "--quiet").exit_code == 0
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(toy_models, write_recipe, run_yaml, tmp_path):
    recipe = _dare_recipe(toy_models, write_recipe, "dare.yml")
    result = run_yaml(recipe, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0
    assert "method: dare_ties" in result.output and "output: 39 tensors in 4 layers" in result.output
    assert "estimated peak memory" in result.output
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_existing_output(toy_models, write_recipe, run_yaml, tmp_path):
    recipe = _dare_recipe(toy_models, write_recipe, "dare.yml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --overwrite")
    assert run_yaml(recipe, out, "--quiet").exit_code == 1
    assert (out / "old.txt").exists()
    assert run_yaml(recipe, out, "--quiet", "--overwrite").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "config", ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough"]
)
def test_example_recipes_plan_against_the_toy_models(config, run_yaml, tmp_path, monkeypatch):
    """Every recipe in configs/ is valid against the toy models the demo generates."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    from make_toy_models import make_all

    monkeypatch.chdir(tmp_path)
    make_all(tmp_path / "toy-models")
    result = run_yaml(root / "configs" / f"{config}.yml", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
