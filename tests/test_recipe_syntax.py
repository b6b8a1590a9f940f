"""Recipe syntax mergekit accepts: modules, ignored keys with warnings, typo hints, per-layer picks, source filters."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import read_tensors

from moemerge.config.merge_recipe import MergeRecipe, load_merge_recipe
from moemerge.errors import ConfigError
from moemerge.io.loader import ModelPool
from moemerge.plan.dense_plan import plan_merge
from moemerge.toys import make_toy_model

Q_PROJ = "model.layers.{}.self_attn.q_proj.weight"


def plan(recipe: dict):
    return plan_merge(MergeRecipe.model_validate(recipe), ModelPool())


def by_name(merge_plan):
    return {merge.spec.name: merge for merge in merge_plan.merges}


@pytest.fixture(scope="module")
def bf16_coder(toy_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return make_toy_model(root / "coder_bf16", "llama", seed=1, base=toy_models["base"], dtype=torch.bfloat16)


def test_modules_default_is_the_models_recipe_with_its_own_parameter_level(toy_models):
    models = [{"model": str(toy_models["coder"])}, {"model": str(toy_models["math"]), "parameters": {"weight": 3.0}}]
    flat = plan({"merge_method": "linear", "models": models, "parameters": {"weight": 1.0, "normalize": False}})
    moduled = plan(
        {
            "merge_method": "linear",
            "modules": {"default": {"models": models, "parameters": {"weight": 1.0}}},
            "parameters": {"weight": 7.0, "normalize": False},  # the module level takes precedence over global
        }
    )
    assert [m.spec for m in flat.merges] == [m.spec for m in moduled.merges]
    for a, b in zip(flat.merges, moduled.merges, strict=True):
        assert a.inputs == b.inputs and a.model_params == b.model_params and a.method_params == b.method_params
    assert [p.weight for p in moduled.merges[0].model_params] == [1.0, 3.0]


def test_modules_with_slices_and_an_unknown_module_name(toy_models):
    coder = str(toy_models["coder"])
    stacked = plan(
        {
            "merge_method": "passthrough",
            "modules": {"default": {"slices": [{"sources": [{"model": coder, "layer_range": [0, 1]}]}] * 2}},
        }
    )
    assert stacked.layer_count == 2
    with pytest.raises(ConfigError, match=r"modules.defualt: .*no module 'defualt' \(did you mean 'default'\?\)"):
        plan({"merge_method": "linear", "modules": {"defualt": {"models": [{"model": coder}]}}})


def test_null_parameters_and_revision_and_ignored_keys(write_recipe, caplog):
    path = write_recipe(
        "merge_method: linear\n"
        "out_path: ./somewhere\n"
        "name: my-merge\n"
        "parameters:\n"
        "  # normalize: true\n"
        "models:\n"
        "  - model: org/coder\n"
        "    revision: abc123\n"
        "    parameters:\n"
        "      # weight: 1.0\n"
        "  - model: {model: {path: org/math, revision: v2}}\n"
    )
    with caplog.at_level(logging.WARNING):
        recipe, _ = load_merge_recipe(path)
    assert recipe.parameters == {} and recipe.models[0].parameters == {}
    assert [m.model for m in recipe.models] == ["org/coder@abc123", "org/math@v2"]
    assert "out_path: ignored" in caplog.text and "name: ignored" in caplog.text


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "dtpye": "bf16"},
            "dtpye: unknown key (did you mean 'dtype'?)",
        ),
        ({"merge_method": "linear", "models": [{"model": "a", "paramters": {}}]}, "did you mean 'parameters'?"),
        ({"merge_method": "linear", "models": [{"model": "a@x", "revision": "y"}]}, "contradicts"),
    ],
)
def test_unknown_keys_stay_errors_with_a_hint(write_recipe, recipe, message):
    with pytest.raises(ConfigError) as error:
        load_merge_recipe(write_recipe(recipe))
    assert message in str(error.value)


def test_another_methods_parameter_warns_and_is_ignored_a_typo_fails(toy_models, caplog):
    base, coder = str(toy_models["base"]), str(toy_models["coder"])
    with caplog.at_level(logging.WARNING):
        slerp = plan(
            {
                "merge_method": "slerp",
                "base_model": base,
                "models": [{"model": base, "parameters": {"weight": 0.5}}, {"model": coder}],
                "parameters": {"t": 0.3},
            }
        )
        linear = plan({"merge_method": "linear", "models": [{"model": coder}], "parameters": {"weight": 1, "t": 0.5}})
    assert "weight: ignored (not a parameter of slerp)" in caplog.text
    assert "parameters.t: ignored (not a parameter of linear)" in caplog.text
    assert slerp.merges[0].method_params.t == 0.3 and linear.merges[0].model_params[0].weight == 1
    with pytest.raises(
        ConfigError, match=r"parameters.wieght: unknown parameter for linear \(did you mean 'weight'\?\)"
    ):
        plan({"merge_method": "linear", "models": [{"model": coder}], "parameters": {"wieght": 1}})


def test_boolean_gradient_picks_a_value_per_layer_as_mergekit(toy_models):
    models = [{"model": str(toy_models[name]), "parameters": {"weight": 1.0}} for name in ("coder", "math")]
    merges = by_name(plan({"merge_method": "linear", "models": models, "parameters": {"normalize": [True, False]}}))
    layers = 4  # the toy models' depth: t = 0, 1/3, 2/3, 1
    picks = [merges[Q_PROJ.format(layer)].method_params.normalize for layer in range(layers)]
    assert picks == [True, True, True, False]  # mergekit: values[int(t * (n - 1))], not a rounded interpolation
    three = by_name(plan({"merge_method": "linear", "models": models, "parameters": {"normalize": [1, 0, 1]}}))
    assert [three[Q_PROJ.format(layer)].method_params.normalize for layer in range(layers)] == [True, True, False, True]


def test_source_filter_matches_the_source_tensor_name_not_the_output_name(toy_models, write_recipe, run_yaml, tmp_path):
    coder = str(toy_models["coder"])
    scale_layer_1 = {"scale": [{"filter": "layers.1.", "value": 2.0}, {"value": 1.0}]}
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": coder, "layer_range": [1, 2], "parameters": scale_layer_1}]},  # output layer 0
            {"sources": [{"model": coder, "layer_range": [0, 1], "parameters": scale_layer_1}]},  # output layer 1
        ],
    }
    assert run_yaml(write_recipe(recipe), tmp_path / "out", "--quiet").exit_code == 0
    merged, source = read_tensors(tmp_path / "out"), read_tensors(toy_models["coder"])
    torch.testing.assert_close(merged[Q_PROJ.format(0)], 2.0 * source[Q_PROJ.format(1)])
    torch.testing.assert_close(merged[Q_PROJ.format(1)], source[Q_PROJ.format(0)])


def test_without_dtype_each_tensor_takes_the_promoted_input_dtype(toy_models, bf16_coder):
    mixed = [{"model": str(bf16_coder), "parameters": {"weight": 1}}, {"model": str(toy_models["math"])}]
    merges = plan({"merge_method": "linear", "models": mixed, "parameters": {"weight": 1}}).merges
    assert {merge.spec.dtype for merge in merges} == {torch.float32}
    alone = plan({"merge_method": "linear", "models": mixed[:1]}).merges
    assert {merge.spec.dtype for merge in alone} == {torch.bfloat16}
    cast = plan({"merge_method": "linear", "models": mixed, "parameters": {"weight": 1}, "dtype": "bfloat16"}).merges
    assert {merge.spec.dtype for merge in cast} == {torch.bfloat16}


def test_int8_mask_gives_the_same_tensors(toy_models, write_recipe, run_yaml, tmp_path):
    outputs = []
    for int8_mask in (False, True):
        recipe = {
            "merge_method": "ties",
            "base_model": str(toy_models["base"]),
            "models": [
                {"model": str(toy_models[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("coder", "math")
            ],
            "parameters": {"int8_mask": int8_mask},
        }
        out = tmp_path / f"out-{int8_mask}"
        assert run_yaml(write_recipe(recipe, f"{int8_mask}.yml"), out, "--quiet").exit_code == 0
        outputs.append(read_tensors(out))
    for name, tensor in outputs[0].items():
        assert torch.equal(tensor, outputs[1][name]), name
