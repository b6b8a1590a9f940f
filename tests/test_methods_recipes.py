"""The methods added for mergekit parity, end to end through `moemerge-yaml` on the toy Llama models.

Each output tensor must equal the method applied to the inputs read independently (so the planner passed
the right inputs, base and parameters), and transformers must load and run the merged model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_tensors
from methods_support import run_merge
from transformers import AutoModelForCausalLM

FINE_TUNES = ("coder", "math", "story")


def _recipe(toy_models, method: str, models: list[tuple[str, dict]], base: bool, parameters: dict) -> dict:
    recipe = {
        "merge_method": method,
        "models": [{"model": str(toy_models[name]), "parameters": params} for name, params in models],
        "parameters": parameters,
    }
    if base:
        recipe["base_model"] = str(toy_models["base"])
    return recipe


# method, models (name, per-model parameters), passes the base separately, method parameters, inputs: the
# tensors the method sees (None: the listed models)
RECIPES = [
    ("della", [(n, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}) for n in FINE_TUNES], True, {"lambda": 0.9}),
    ("della_linear", [(n, {"weight": 0.4, "density": 0.6}) for n in FINE_TUNES[:2]], True, {}),
    ("model_stock", [(n, {}) for n in FINE_TUNES], True, {"filter_wise": False}),
    ("nuslerp", [("coder", {"weight": 0.7}), ("math", {"weight": 0.3})], True, {"nuslerp_flatten": False}),
    ("nuslerp", [("coder", {"weight": 0.7}), ("math", {"weight": 0.3})], False, {"nuslerp_row_wise": True}),
    ("multislerp", [(n, {"weight": w}) for n, w in zip(FINE_TUNES, (0.2, 0.3, 0.5), strict=True)], True, {}),
    ("multislerp", [(n, {"weight": 1.0}) for n in FINE_TUNES[:2]], False, {}),
    ("sce", [(n, {}) for n in FINE_TUNES], True, {"select_topk": 0.3}),
    ("nearswap", [("coder", {})], True, {"t": 0.01}),
    ("arcee_fusion", [("math", {})], True, {}),
    ("ram", [(n, {}) for n in FINE_TUNES], True, {"epsilon": 0.02}),
    ("ramplus_tl", [(n, {}) for n in FINE_TUNES], True, {"epsilon": 0.02, "r": 0.3}),
]


def _loads_and_runs(folder) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method, models, base, parameters", RECIPES, ids=lambda v: v if isinstance(v, str) else "")
def test_recipe_matches_the_method_per_tensor_and_loads(
    method, models, base, parameters, toy_models, write_recipe, run_yaml, tmp_path
):
    recipe = write_recipe(_recipe(toy_models, method, models, base, parameters))
    result = run_yaml(recipe, tmp_path / "out", "--random-seed", 3, "--quiet", "--no-copy-tokenizer")
    assert result.exit_code == 0, result.output
    merged = read_tensors(tmp_path / "out")
    inputs = [read_tensors(toy_models[name]) for name, _ in models]
    base_tensors = read_tensors(toy_models["base"]) if base else None
    for name, tensor in merged.items():
        generator_seed = None
        if method.startswith("della"):
            from moemerge.dense_merge import tensor_seed

            generator_seed = tensor_seed(3, name)
        expected = run_merge(
            method,
            [model[name] for model in inputs],
            base_tensors[name] if base else None,
            [params for _, params in models],
            parameters,
            seed=generator_seed,
        )
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    _loads_and_runs(tmp_path / "out")


def test_karcher_takes_the_base_model_as_one_more_input(toy_models, write_recipe, run_yaml, tmp_path):
    recipe = write_recipe(_recipe(toy_models, "karcher", [("coder", {}), ("math", {})], True, {"max_iter": 5}))
    assert run_yaml(recipe, tmp_path / "out", "--quiet", "--no-copy-tokenizer").exit_code == 0
    merged = read_tensors(tmp_path / "out")
    inputs = [read_tensors(toy_models[name]) for name in ("coder", "math", "base")]
    for name, tensor in merged.items():
        expected = run_merge("karcher", [model[name] for model in inputs], None, [{}] * 3, {"max_iter": 5})
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    _loads_and_runs(tmp_path / "out")


def test_della_is_byte_identical_for_a_seed_and_worker_count(toy_models, write_recipe, run_yaml, tmp_path):
    models = [(n, {"weight": 0.5, "density": 0.4}) for n in FINE_TUNES]
    recipe = write_recipe(_recipe(toy_models, "della", models, True, {}))
    for out, seed, workers in (("a", 7, 1), ("b", 7, 2), ("c", 8, 2)):
        args = ("--random-seed", seed, "--workers", workers, "--quiet", "--no-copy-tokenizer")
        assert run_yaml(recipe, tmp_path / out, *args).exit_code == 0
    shard = "model-00001-of-00001.safetensors"
    first, second, third = ((tmp_path / o / shard).read_bytes() for o in "abc")
    assert first == second and first != third


@pytest.mark.parametrize(
    "method, models, parameters, message",
    [
        ("model_stock", ["coder"], {}, "at least 2 models besides base_model"),
        ("nuslerp", ["coder", "math", "story"], {"t": 0.5}, "exactly 2 other model"),
        ("nearswap", ["coder", "math"], {"t": 0.5}, "exactly 1 other model"),
    ],
)
def test_input_counts_are_checked_before_merging(
    method, models, parameters, message, toy_models, write_recipe, run_yaml, tmp_path
):
    recipe = write_recipe(_recipe(toy_models, method, [(n, {}) for n in models], True, parameters))
    result = run_yaml(recipe, tmp_path / "out", "--quiet")
    assert result.exit_code != 0 and message in result.output
