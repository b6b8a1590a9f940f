"""Low-precision math: methods compute in float32 and round once to the math dtype, whole tensors and row blocks.

Against a float64 reference (the bfloat16-rounded inputs merged exactly, then correctly rounded), moemerge's
`dtype: bfloat16` output must never be further off than the straightforward stacked reduction that
accumulates in float32 (mergekit's linear), entry by entry.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_tensors

# weights on a 2⁻²⁰ grid summing to 1: bfloat16 inputs × 20-bit weights need 28 bits, more than float32 holds,
# while three such terms stay exact in float64, so the float64 reference below is the exact result
WEIGHTS = {"coder": 314573 / 2**20, "math": 471859 / 2**20, "story": 0.25}


def round_to_bfloat16(exact: torch.Tensor) -> torch.Tensor:
    """Correctly rounded (nearest, ties to even) bfloat16 values of float64 `exact`, as float64.

    torch converts float64 to bfloat16 through float32, which can round twice; here the bfloat16 spacing at
    each value (2^(e−8) for |x| = m·2^e, m in [½, 1)) divides exactly and torch.round rounds half to even.
    """
    _, exponent = torch.frexp(exact)
    spacing = torch.pow(2.0, (exponent - 8).to(torch.float64))
    return torch.where(exact == 0, exact, torch.round(exact / spacing) * spacing)


def _merge(run_yaml, write_recipe, toy_models, out, method: str, dtype: str, extra: dict | None = None):
    recipe = {
        "merge_method": method,
        "models": [{"model": str(toy_models[n]), "parameters": {"weight": w}} for n, w in WEIGHTS.items()],
        "dtype": dtype,
        **(extra or {}),
    }
    result = run_yaml(write_recipe(recipe, f"{out.name}.yml"), out, "--quiet", "--no-copy-tokenizer")
    assert result.exit_code == 0, result.output
    return read_tensors(out)


def test_the_reference_rounding_is_correct() -> None:
    exact = torch.tensor(
        [1.0 + 2**-8 + 2**-40, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -3.0 - 2**-7 - 2**-30, 0.0], dtype=torch.float64
    )
    assert round_to_bfloat16(exact).tolist() == [1.0 + 2**-7, 1.0, 1.0 + 4 * 2**-8, -3.0 - 2**-6, 0.0]
    assert exact[:1].to(torch.bfloat16).item() == 1.0  # torch's own conversion rounds twice here


@pytest.mark.parametrize("block", [None, 1000])  # None: whole tensors; 1000: row blocks of the toy matrices
def test_bfloat16_linear_is_never_further_from_the_exact_result_than_a_float32_stacked_sum(
    toy_models, write_recipe, run_yaml, tmp_path, monkeypatch, block
):
    """Linear accumulates in float64 and rounds once (correctly): with weights whose products and sums are
    exact in float64 it is the correctly rounded result everywhere, where a float32 sum rounds twice."""
    import moemerge.dense_merge

    if block is not None:
        monkeypatch.setattr(moemerge.dense_merge, "BLOCK_ELEMENTS", block)
    merged = _merge(run_yaml, write_recipe, toy_models, tmp_path / "out", "linear", "bfloat16")
    inputs = {name: read_tensors(toy_models[name]) for name in WEIGHTS}
    off_ours = off_stacked = total = 0
    for name, tensor in merged.items():
        rounded = [inputs[model][name].to(torch.bfloat16) for model in WEIGHTS]  # the math dtype's inputs
        exact = sum(w * x.double() for w, x in zip(WEIGHTS.values(), rounded, strict=True)) / sum(WEIGHTS.values())
        reference = round_to_bfloat16(exact)
        weights = torch.tensor(list(WEIGHTS.values())).reshape(-1, *[1] * tensor.dim())
        stacked = ((torch.stack(rounded).float() * weights).sum(0) / weights.sum()).to(torch.bfloat16)
        ours_error = (tensor.double() - reference).abs()
        stacked_error = (stacked.double() - reference).abs()
        assert tensor.dtype == torch.bfloat16
        assert bool((ours_error <= stacked_error).all()), name
        off_ours += int(torch.count_nonzero(ours_error))
        off_stacked += int(torch.count_nonzero(stacked_error))
        total += tensor.numel()
    assert off_ours == 0 and off_stacked > 0, (off_ours, off_stacked, total)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "multislerp"])
def test_bfloat16_math_rounds_once(toy_models, write_recipe, run_yaml, tmp_path, method):
    """The bfloat16 output is the float32 computation on the same bfloat16-rounded inputs, rounded once."""
    extra = {"base_model": str(toy_models["base"])} if method != "multislerp" else {}
    if method == "ties":
        extra["parameters"] = {"density": 0.5}
    low = _merge(run_yaml, write_recipe, toy_models, tmp_path / "bf16", method, "bfloat16", extra)
    # the same inputs rounded to bfloat16 first, merged in float32: moemerge's float32 path on rounded models
    rounded_models = {}
    from safetensors.torch import save_file

    for name in [*WEIGHTS, "base"]:
        folder = tmp_path / f"rounded-{name}"
        folder.mkdir()
        for item in toy_models[name].iterdir():
            if item.suffix != ".safetensors" and item.is_file():
                (folder / item.name).write_bytes(item.read_bytes())
        tensors = {k: v.to(torch.bfloat16).float() for k, v in read_tensors(toy_models[name]).items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        rounded_models[name] = folder
    if "base_model" in extra:
        extra["base_model"] = str(rounded_models["base"])
    high = _merge(run_yaml, write_recipe, rounded_models, tmp_path / "fp32", method, "float32", extra)
    for name, tensor in low.items():
        assert torch.equal(tensor, high[name].to(torch.bfloat16)), name
