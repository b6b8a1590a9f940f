"""Broken recipes and inputs: one readable line naming the key or tensor, exit 1, and no output folder left."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch


def assert_clean_failure(result, out: Path, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []
    return lines[-1]


def linear(*models: Path | str, **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **extra,
    }


def ties(base, *models, **parameters) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5, **parameters}} for m in models],
    }


CASES = {
    "unknown top-level key": (lambda m: {**linear(m["coder"]), "merge_methd": "x"}, ["merge_methd", "unknown key"]),
    "unknown method": (lambda m: {**linear(m["coder"]), "merge_method": "tiez"}, ["merge_method", "'tiez'"]),
    "typo in a parameter": (
        lambda m: {"merge_method": "linear", "models": [{"model": str(m["coder"]), "parameters": {"wieght": 1}}]},
        ["models[0].parameters.wieght", "unknown parameter"],
    ),
    "missing required parameter": (
        lambda m: {"merge_method": "linear", "models": [{"model": str(m["coder"])}]},
        ["'weight' is required"],
    ),
    "wrong parameter type": (lambda m: ties(m["base"], m["coder"], density="half"), ["'density'"]),
    "missing model folder": (lambda m: linear(m["coder"], "/nonexistent/model"), ["'/nonexistent/model'", "not found"]),
    "hub model not in the offline cache": (
        lambda m: linear(m["coder"], "nobody/no-such-model"),
        ["'nobody/no-such-model'", "not found"],
    ),
    "ties without base_model": (
        lambda m: {"merge_method": "ties", "models": [{"model": str(m["coder"]), "parameters": {"weight": 1}}]},
        ["base_model", "required"],
    ),
    "slerp with three models": (
        lambda m: {
            "merge_method": "slerp",
            "base_model": str(m["base"]),
            "models": [{"model": str(m["coder"])}, {"model": str(m["math"])}],
            "parameters": {"t": 0.5},
        },
        ["slerp", "exactly 1"],
    ),
    "passthrough with two sources in a slice": (
        lambda m: {
            "merge_method": "passthrough",
            "slices": [
                {
                    "sources": [
                        {"model": str(m["coder"]), "layer_range": [0, 2]},
                        {"model": str(m["math"]), "layer_range": [0, 2]},
                    ]
                }
            ],
        },
        ["slices[0]", "exactly one model"],
    ),
    "layer range past the end": (
        lambda m: {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(m["coder"]), "layer_range": [2, 9]}]}],
        },
        ["slices[0]", "[2, 9]", "4 layers"],
    ),
    "mismatched shapes": (
        lambda m: linear(m["coder"], m["wide"]),
        ["mlp.down_proj", "[64, 96]", "[64, 128]", "--allow-crimes"],
    ),
    "different layer counts": (lambda m: linear(m["coder"], m["deep"]), ["layer counts differ"]),
    "bad dtype": (lambda m: {**linear(m["coder"]), "dtype": "float8"}, ["dtype", "'float8'"]),
    "unknown chat template": (lambda m: {**linear(m["coder"]), "chat_template": "vicuna"}, ["chat_template", "vicuna"]),
    "tokenizer twice": (
        lambda m: {**linear(m["coder"]), "tokenizer_source": "union", "tokenizer": {"source": "base"}},
        ["'tokenizer_source' or a 'tokenizer' block"],
    ),
    "missing tokenizer source": (
        lambda m: {**linear(m["coder"]), "tokenizer_source": "/nonexistent/tokenizer"},
        ["'/nonexistent/tokenizer'", "not found"],
    ),
    "empty models list": (lambda m: {"merge_method": "linear", "models": []}, ["'models' is empty"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe(case, toy_models, write_recipe, run_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    build, fragments = CASES[case]
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(write_recipe(build(toy_models)), out), out, *fragments)


def test_invalid_yaml(write_recipe, run_yaml, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    assert_clean_failure(run_yaml(recipe, out), out, "not valid YAML", "line")


def test_missing_recipe_file(run_yaml, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(tmp_path / "nope.yml", out), out, "cannot read recipe", "nope.yml")


def test_model_folder_without_config(toy_models, write_recipe, run_yaml, tmp_path):
    broken = tmp_path / "no-config"
    shutil.copytree(toy_models["coder"], broken)
    (broken / "config.json").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(write_recipe(linear(broken)), out), out, "no config.json")


def test_missing_tensor_is_named(toy_models, write_recipe, run_yaml, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "missing-tensor"
    shutil.copytree(toy_models["math"], broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.2.mlp.down_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = run_yaml(write_recipe(linear(toy_models["coder"], broken)), out)
    assert_clean_failure(result, out, "'model.layers.2.mlp.down_proj.weight'", str(broken))


class _Exploit:
    """Unpickling this would create a marker file: it must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(toy_models, write_recipe, run_yaml, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(toy_models["coder_bin"], evil)
    marker = tmp_path / "pwned"
    state = torch.load(evil / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = _Exploit(marker)
    with open(evil / "pytorch_model.bin", "wb") as file:
        pickle.dump(state, file)
    out = tmp_path / "out"
    result = run_yaml(write_recipe(linear(toy_models["coder"], evil)), out)
    assert_clean_failure(result, out, "refusing", "pytorch_model.bin")
    assert not marker.exists()


def test_non_empty_output_is_kept(toy_models, write_recipe, run_yaml, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not delete")
    result = run_yaml(write_recipe(linear(toy_models["coder"])), out)
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    assert (out / "precious.txt").read_text() == "do not delete"


def test_full_disk_leaves_nothing_behind(toy_models, write_recipe, run_yaml, tmp_path, monkeypatch):
    def no_space(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(write_recipe(linear(toy_models["coder"])), out), out, "disk full")


def test_failure_mid_merge_leaves_no_output(toy_models, write_recipe, run_yaml, tmp_path, monkeypatch):
    """A crash after some tensors are written (here: the disk fills up on a later write) removes the partial folder."""
    real_pwrite, calls = os.pwrite, []

    def fill_up(fd, data, offset):
        calls.append(offset)
        if len(calls) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fill_up)
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(write_recipe(linear(toy_models["coder"])), out, "--workers", 1), out, "disk full")


def test_verbose_shows_the_traceback(write_recipe, run_yaml, tmp_path):
    result = run_yaml(write_recipe(linear("/nonexistent/model")), tmp_path / "out", "--verbose")
    assert result.exit_code == 1 and "Traceback" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu(toy_models, write_recipe, run_yaml, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(write_recipe(linear(toy_models["coder"])), out, "--device", "cuda"), out, "CUDA")


def test_bad_shard_size_is_a_usage_error(toy_models, write_recipe, run_yaml, tmp_path):
    result = run_yaml(write_recipe(linear(toy_models["coder"])), tmp_path / "out", "--out-shard-size", "lots")
    assert result.exit_code == 2 and "--out-shard-size" in result.output
    assert not (tmp_path / "out").exists()


def test_full_disk_while_the_tokenizer_is_copied(toy_models, write_recipe, run_yaml, tmp_path, monkeypatch):
    """The tensors fit, then the disk fills up during the tokenizer copy: one line naming the file, no output."""

    real_copyfile = shutil.copyfile

    def no_space(source, target, *args, **kwargs):
        if Path(target).name.startswith("tokenizer"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copyfile(source, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", no_space)
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(write_recipe(linear(toy_models["coder"])), out), out, "disk full", "tokenizer")
