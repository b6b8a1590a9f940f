"""Every family in the architecture table that transformers can build: merged (linear, passthrough), reloaded, run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_tensors
from family_models import FAMILIES, REMOTE_CODE_ONLY, SLOW_TO_BUILD, build_family, load_family

from moemerge.architectures import find_architecture, layer_count

SEQ2SEQ = {"t5", "whisper"}
NO_TEXT_ONLY_FORWARD = {"llama4"}  # transformers 5.24's Llama4 forward fails without pixel_values


@pytest.fixture(scope="module")
def family_pair(tmp_path_factory):
    """(seed-1 model, seed-2 model) of a family, built on first use."""
    root = tmp_path_factory.mktemp("arch-families")
    built: dict[str, tuple] = {}

    def pair(model_type: str):
        if model_type not in built:
            built[model_type] = tuple(build_family(root / f"{model_type}-{seed}", model_type, seed) for seed in (1, 2))
        return built[model_type]

    return pair


def _run(model, model_type: str) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99]])
    inputs = {"input_ids": ids}
    if model_type == "whisper":
        inputs = {"input_features": torch.ones(1, 8, 32), "decoder_input_ids": ids}
    elif model_type in SEQ2SEQ:
        inputs["decoder_input_ids"] = ids
    with torch.no_grad():
        output = model(**inputs)
    return output.logits if "logits" in output else output.last_hidden_state


def _load_cleanly(folder, model_type: str):
    model, info = load_family(folder, model_type)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if model_type not in NO_TEXT_ONLY_FORWARD:
        assert torch.isfinite(_run(model.eval(), model_type)).all()
    return model


def test_every_family_has_an_entry():
    missing = [name for name in [*FAMILIES, *REMOTE_CODE_ONLY, *SLOW_TO_BUILD] if find_architecture(name) is None]
    assert missing == []


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_merges_and_loads(model_type, family_pair, write_recipe, run_yaml, tmp_path):
    a, b = family_pair(model_type)
    arch = find_architecture(model_type)
    linear = write_recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(a), "parameters": {"weight": 0.5}},
                {"model": str(b), "parameters": {"weight": 0.5}},
            ],
        }  # fmt: skip
    )
    result = run_yaml(linear, tmp_path / "linear", "--quiet", "--no-copy-tokenizer")
    assert result.exit_code == 0, result.output
    merged, first, second = read_tensors(tmp_path / "linear"), read_tensors(a), read_tensors(b)
    assert set(merged) == set(first)
    for name in merged:
        if first[name].is_floating_point():
            torch.testing.assert_close(merged[name], 0.5 * first[name] + 0.5 * second[name])
    _load_cleanly(tmp_path / "linear", model_type)

    # A frankenmerge: layers 0-1 of a, then layer 1 of b again; only the decoder stack grows.
    frankenmerge = write_recipe(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(b), "layer_range": [1, 2]}]},
            ],
        },  # fmt: skip
        name="passthrough.yml",
    )
    result = run_yaml(frankenmerge, tmp_path / "franken", "--quiet", "--no-copy-tokenizer")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "franken" / "config.json").read_text())
    original = json.loads((a / "config.json").read_text())
    assert layer_count(config, arch) == 3
    for stack in arch.stacks[1:]:
        assert layer_count(config, arch, stack=stack) == layer_count(original, arch, stack=stack)
    output = read_tensors(tmp_path / "franken")
    third_layer = {arch.with_layer(n, 1): t for n, t in second.items() if arch.layer_of(n) == 1}
    for name, tensor in third_layer.items():
        assert torch.equal(output[arch.with_layer(name, 2)], tensor)
    vision = [name for name in first if arch.stack_of(name) not in (None, "decoder")]
    for name in vision:  # other stacks are copied as they are, never renumbered into the decoder
        assert torch.equal(output[name], first[name]) or torch.equal(output[name], second[name])
    model = _load_cleanly(tmp_path / "franken", model_type)
    assert model is not None
