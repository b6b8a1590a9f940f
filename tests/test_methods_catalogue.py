"""Every registered method: parameter models reject unknown keys, require what has no default, use YAML names."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from moemerge.config.merge_recipe import parse_merge_recipe
from moemerge.config.method_names import MERGE_METHODS
from moemerge.errors import ConfigError
from moemerge.methods import METHODS, get_method

ALL = ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough"]
ALL += ["breadcrumbs", "breadcrumbs_ties"]
# the rest of the names mergekit 0.1.5's registry holds (mergekit.merge_methods.registry), so every recipe's
# merge_method resolves
ALL += ["della", "della_linear", "model_stock", "nuslerp", "multislerp", "karcher", "sce", "nearswap"]
ALL += ["arcee_fusion", "ram", "ramplus_tl"]
TASK_VECTOR = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"]


def test_catalogue_registers_every_method() -> None:
    get_method("linear")
    assert sorted(METHODS) == sorted(ALL)
    with pytest.raises(ConfigError, match="merge_method: unknown method 'tiez' \\(did you mean 'ties'\\?\\)"):
        get_method("tiez")


def test_recipes_know_the_method_names_without_torch() -> None:
    """The torch-free list a recipe is checked against is the registry's, and a typo fails while parsing."""
    get_method("linear")
    assert list(MERGE_METHODS) == sorted(METHODS)
    with pytest.raises(ConfigError, match=r"r\.yml: merge_method: unknown method 'lineer' \(did you mean 'linear'\?\)"):
        parse_merge_recipe({"merge_method": "lineer", "models": [{"model": "a"}]}, "r.yml")
    code = (
        "import sys\nfrom moemerge.config.merge_recipe import parse_merge_recipe\n"
        "try:\n    parse_merge_recipe({'merge_method': 'tiez', 'models': [{'model': 'a'}]}, 'r.yml')\n"
        "except Exception as error:\n    print(error)\nprint('torch' in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.splitlines() == [
        f"r.yml: merge_method: unknown method 'tiez' (did you mean 'ties'?); known: {', '.join(MERGE_METHODS)}",
        "False",
    ]


@pytest.mark.parametrize("name", ALL)
def test_unknown_keys_are_rejected(name: str) -> None:
    method = get_method(name)
    for params_type in (method.model_params, method.method_params):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            params_type.model_validate({"wieght": 1.0})


@pytest.mark.parametrize(
    "name, required_model, required_method",
    [
        ("linear", {"weight"}, set()),
        ("slerp", set(), {"t"}),
        ("task_arithmetic", {"weight"}, set()),
        ("ties", {"weight"}, set()),
        ("dare_ties", {"weight"}, set()),
        ("dare_linear", {"weight"}, set()),
        ("passthrough", set(), set()),
        ("breadcrumbs", {"weight"}, set()),
        ("della", {"weight"}, set()),
        ("della_linear", {"weight"}, set()),
        ("model_stock", set(), set()),
        ("nuslerp", set(), set()),  # a weight per model or a method-level t, checked when merging
        ("multislerp", {"weight"}, set()),
        ("karcher", set(), set()),
        ("sce", set(), set()),
        ("nearswap", set(), {"t"}),
        ("arcee_fusion", set(), set()),
        ("ram", set(), set()),
        ("ramplus_tl", set(), set()),
    ],
)
def test_required_parameters(name: str, required_model: set[str], required_method: set[str]) -> None:
    method = get_method(name)
    for params_type, required in ((method.model_params, required_model), (method.method_params, required_method)):
        if required:
            with pytest.raises(ValidationError) as error:
                params_type.model_validate({})
            assert {e["loc"][0] for e in error.value.errors() if e["type"] == "missing"} == required
        else:
            params_type.model_validate({})


@pytest.mark.parametrize("name", TASK_VECTOR)
def test_task_vector_methods_take_lambda_rescale_and_int8_mask(name: str) -> None:
    params = get_method(name).method_params.model_validate({"lambda": 0.5, "int8_mask": 1.0, "rescale": False})
    assert params.lambda_ == 0.5 and params.int8_mask is True and params.rescale is False
    assert get_method(name).uses_base


def test_defaults_match_mergekit() -> None:
    defaults = {name: get_method(name).method_params.model_validate({}) for name in TASK_VECTOR + ["linear"]}
    assert defaults["linear"].normalize is True
    assert defaults["task_arithmetic"].normalize is False
    assert defaults["ties"].normalize is True
    assert defaults["dare_ties"].normalize is False and defaults["dare_ties"].rescale is True
    assert defaults["breadcrumbs"].normalize is False and defaults["breadcrumbs_ties"].normalize is False
    assert all(defaults[name].lambda_ == 1.0 for name in TASK_VECTOR)
    assert [name for name in TASK_VECTOR if defaults[name].rescale] == ["dare_ties", "dare_linear"]
    assert get_method("breadcrumbs").model_params.model_validate({"weight": 1}).gamma == 0.01
    assert get_method("ties").model_params.model_validate({"weight": 1}).density == 1.0


@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_density_outside_unit_interval_is_rejected(density: float) -> None:
    for name in ("ties", "dare_ties", "breadcrumbs"):
        with pytest.raises(ValidationError, match="density"):
            get_method(name).model_params.model_validate({"weight": 1.0, "density": density})


def test_method_shapes() -> None:
    assert get_method("slerp").model_count == 1 and get_method("slerp").uses_base
    assert not get_method("linear").uses_base
    with pytest.raises(ValidationError):
        get_method("linear").method_params.model_validate({"int8_mask": True})


def test_new_method_defaults_and_shapes_match_mergekit() -> None:
    della = get_method("della").method_params.model_validate({})
    della_linear = get_method("della_linear").method_params.model_validate({})
    assert della.normalize and della.rescale and not della_linear.normalize and della_linear.rescale
    assert get_method("della").model_params.model_validate({"weight": 1}).epsilon == 0.15
    assert get_method("della").random and get_method("della_linear").random
    nuslerp = get_method("nuslerp").method_params.model_validate({})
    assert nuslerp.nuslerp_flatten and not nuslerp.nuslerp_row_wise
    multislerp = get_method("multislerp").method_params.model_validate({})
    assert multislerp.normalize_weights and multislerp.eps == 1e-8
    karcher = get_method("karcher").method_params.model_validate({})
    assert karcher.max_iter == 10 and karcher.tol == 1e-5
    assert get_method("sce").method_params.model_validate({}).select_topk == 1.0
    assert get_method("ram").method_params.model_validate({}).epsilon == 1e-5
    plus = get_method("ramplus_tl").method_params.model_validate({})
    assert (plus.r, plus.alpha, plus.epsilon) == (0.1, 0.2, 1e-5)
    assert not get_method("model_stock").method_params.model_validate({}).filter_wise
    assert get_method("model_stock").min_model_count == 2
    for name in ("nuslerp", "multislerp"):
        assert get_method(name).optional_base and not get_method(name).uses_base
    assert get_method("karcher").base_is_input and not get_method("karcher").uses_base
    assert get_method("nuslerp").model_count == 2
    for name in ("nearswap", "arcee_fusion"):
        assert get_method(name).model_count == 1 and get_method(name).uses_base


@pytest.mark.parametrize("density, epsilon", [(0.5, 0.5), (0.9, 0.15), (0.1, 0.1)])
def test_della_rejects_keep_probabilities_outside_the_unit_interval(density: float, epsilon: float) -> None:
    with pytest.raises(ValidationError, match="density ± epsilon"):
        get_method("della").model_params.model_validate({"weight": 1.0, "density": density, "epsilon": epsilon})
