"""Hostile or changing inputs: safetensors headers checked by the format's rules, index paths kept inside the model
folder, absurd config values, inputs replaced during a run, and recipes that are not what they seem."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_inputs import assert_clean_failure, linear

from moemerge.config.recipe_file import read_recipe
from moemerge.errors import ConfigError, ModelNotFoundError, TensorError
from moemerge.io.loader import LazyModel

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def write_raw(folder: Path, header: object, data: bytes = bytes(16), header_length: int | None = None) -> Path:
    """A safetensors file with exactly this header (JSON-encoded unless bytes) and data section."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_length is None else header_length
    path = folder / "model.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + raw + data)
    return path


BAD_HEADERS = {
    "header is a JSON list": ([F32], bytes(8), "not a JSON object"),
    "entry is not an object": ({"a": [1, 2]}, bytes(8), "'a' is not a JSON object"),
    "unknown dtype": ({"a": {**F32, "dtype": "F128"}}, bytes(8), "unknown dtype 'F128'"),
    "negative shape": ({"a": {**F32, "shape": [-2]}}, bytes(8), "non-negative"),
    "overflowing shape": ({"a": {**F32, "shape": [2**62, 2**62]}}, bytes(8), "do not match its shape"),
    "offsets into the header": ({"a": {**F32, "data_offsets": [-8, 0]}}, bytes(8), "non-negative"),
    "overlapping offsets": (
        {"a": F32, "b": {**F32, "data_offsets": [4, 12]}},
        bytes(12),
        "'b' at byte 4 overlaps",
    ),
    "a gap between tensors": ({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, bytes(20), "gap"),
    "offsets past the data": ({"a": {**F32, "data_offsets": [8, 16]}}, bytes(8), "gap"),
    "trailing bytes": ({"a": F32}, bytes(16), "data section holds 16"),
    "offsets that do not match the shape": ({"a": {**F32, "data_offsets": [0, 4]}}, bytes(4), "do not match"),
    "duplicate names": (
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
        bytes(16),
        "'a' is listed twice",
    ),
    "not JSON": (b"{not json}", bytes(8), "model.safetensors is not a valid safetensors file"),
    "not UTF-8": (b'{"\xff": 1}', bytes(8), "model.safetensors is not a valid safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers_are_refused_as_the_safetensors_library_refuses_them(case, tmp_path):
    header, data, fragment = BAD_HEADERS[case]
    path = write_raw(tmp_path / "model", header, data)
    with pytest.raises(Exception):  # noqa: B017 (the reference: the safetensors library refuses it too)
        with safe_open(str(path), framework="pt") as handle:
            [handle.get_tensor(name) for name in handle.keys()]
    with pytest.raises(TensorError, match="model.safetensors is not a valid safetensors file") as error:
        LazyModel(path.parent)
    assert fragment in str(error.value)


def test_a_huge_header_length_is_refused_before_it_is_read(tmp_path):
    """A 600 MB header length in a (sparse) 601 MB file: refused from the length alone, nothing is read."""
    path = write_raw(tmp_path / "model", b"{}", header_length=600 * 10**6)
    os.truncate(path, 601 * 10**6)
    with pytest.raises(TensorError, match="over the format's 100000000-byte limit"):
        LazyModel(path.parent)


def test_a_valid_file_from_the_safetensors_library_is_accepted(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(0, 4), "c": torch.tensor([1, 2], dtype=torch.int8)}
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    model = LazyModel(tmp_path / "m")
    for name, tensor in tensors.items():
        assert torch.equal(model.read(name), tensor)


def _indexed_model(folder: Path, weight_map: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside/model.safetensors", "sub/../../x.safetensors", ""])
def test_index_paths_must_stay_inside_the_model_folder(shard, tmp_path):
    (tmp_path / "outside").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "outside" / "model.safetensors")
    folder = _indexed_model(tmp_path / "model", {"w": shard})
    with pytest.raises(TensorError, match="outside the model folder"):
        LazyModel(folder)


def test_an_index_of_cache_symlinks_still_works(tmp_path):
    """The Hugging Face cache: snapshot files are symlinks into ../../blobs; the names in the index stay inside."""
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    save_file({"w": torch.arange(3.0)}, blobs / "0123abcd")
    snapshot = _indexed_model(tmp_path / "cache" / "snapshots" / "rev", {"w": "model-00001-of-00001.safetensors"})
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/0123abcd")
    assert torch.equal(LazyModel(snapshot).read("w"), torch.arange(3.0))


@pytest.mark.parametrize(
    "text, fragment", [("{not json", "is not valid JSON"), ("[1, 2]", "no 'weight_map'"), ('{"weight_map": 3}', "no")]
)
def test_a_broken_index_is_one_error(text, fragment, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(TensorError, match=fragment):
        LazyModel(folder)


def _broken_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    edit(target)
    return target


CLI_CASES = {
    "header that is JSON but not an object": (
        lambda f: write_raw(f, [1, 2], b""),
        ["model.safetensors", "not a JSON object"],
    ),
    "negative shape": (
        lambda f: write_raw(f, {"model.norm.weight": {**F32, "shape": [-2]}}, bytes(8)),
        ["model.safetensors", "non-negative"],
    ),
    "overflowing shape": (
        lambda f: write_raw(f, {"model.norm.weight": {**F32, "shape": [2**40, 2**40]}}, bytes(8)),
        ["model.safetensors", "do not match its shape"],
    ),
    "index that is not JSON": (
        lambda f: (f / "model.safetensors.index.json").write_text("{oops"),
        ["model.safetensors.index.json", "not valid JSON"],
    ),
    "config that is not UTF-8": (
        lambda f: (f / "config.json").write_bytes(b'{"model_type": "\xff"}'),
        ["config.json is not valid JSON"],
    ),
    "config that is not an object": (lambda f: (f / "config.json").write_text("[]"), ["not a JSON object"]),
    "absurd layer count": (
        lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((f / "config.json").read_text()), "num_hidden_layers": 1e9})
        ),
        ["num_hidden_layers 1000000000", "tensors for 4 layers"],
    ),
    "fractional layer count": (
        lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((f / "config.json").read_text()), "num_hidden_layers": 2.5})
        ),
        ["num_hidden_layers 2.5", "whole number"],
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_broken_inputs_are_one_line(case, toy_models, write_recipe, run_yaml, tmp_path):
    edit, fragments = CLI_CASES[case]
    broken = _broken_copy(toy_models["coder"], tmp_path / "broken", edit)
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(write_recipe(linear(toy_models["math"], broken)), out), out, *fragments)


def test_absurd_layer_counts_fail_fast_in_moe_and_split(toy_models, tmp_path):
    """`num_hidden_layers: 1e9` used to loop (and grow memory) for ever in moemerge-moe and moemerge-split."""
    from click.testing import CliRunner

    from moemerge.cli.moe_command import main as moe_main
    from moemerge.cli.split_command import main as split_main

    def huge(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))

    base = _broken_copy(toy_models["mistral_base"], tmp_path / "base", huge)
    recipe = tmp_path / "moe.yml"
    recipe.write_text(
        f"base_model: {base}\ngate_mode: random\nexperts:\n"
        f"  - source_model: {toy_models['mistral_ft']}\n  - source_model: {toy_models['mistral_ft']}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(moe_main, [str(recipe), str(out)], catch_exceptions=False)
    assert_clean_failure(result, out, "base_model", "num_hidden_layers 1000000000", "tensors for 4 layers")
    moe = _broken_copy(toy_models["mistral_base"], tmp_path / "moe", huge)
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
    result = CliRunner().invoke(split_main, [str(moe), str(out), "--expert", "0"], catch_exceptions=False)
    assert_clean_failure(result, out, "num_hidden_layers 1000000000")


def test_a_long_model_path_is_one_line(write_recipe, run_yaml, tmp_path):
    """The report used 4 MB; 200 kB is as far past the file system's limits and parses 20 times faster."""
    out = tmp_path / "out"
    line = assert_clean_failure(run_yaml(write_recipe(linear("a" * 200_000)), out), out, "200000 characters")
    assert len(line) < 300


def test_a_shard_replaced_during_the_run_is_never_mixed_in(tmp_path):
    """A new file renamed over a shard after its header was read: reads keep coming from the planned file."""
    folder = tmp_path / "model"
    folder.mkdir()
    planned = {"a": torch.arange(4.0), "b": torch.arange(6.0) + 10}
    save_file(planned, folder / "model.safetensors")
    model = LazyModel(folder)
    replacement = tmp_path / "replacement.safetensors"
    save_file({"b": torch.full((2,), -1.0), "a": torch.full((9,), -2.0)}, replacement)  # other offsets too
    os.replace(replacement, folder / "model.safetensors")
    assert torch.equal(model.read("a"), planned["a"]) and torch.equal(model.read("b"), planned["b"])


def test_a_shard_rewritten_in_place_is_reported(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.arange(4.0)}, folder / "model.safetensors")
    model = LazyModel(folder)
    path = folder / "model.safetensors"
    before = os.stat(path)
    with open(path, "r+b") as handle:  # same size, other bytes: only the modification time tells
        handle.seek(-4, os.SEEK_END)
        handle.write(bytes(4))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    with pytest.raises(TensorError, match="changed on disk while moemerge was reading it"):
        model.read("a")


def test_a_merge_ignores_an_input_replaced_after_planning(toy_models, write_recipe, run_yaml, tmp_path, monkeypatch):
    """End to end: the shard is replaced once the plan is made (when the writer starts); the output is the merge
    of what was planned, bit for bit."""
    import moemerge.executor as executor

    victim = shutil.copytree(toy_models["math"], tmp_path / "math")
    replacement = tmp_path / "other.safetensors"
    other = {name: torch.zeros_like(t) for name, t in load_file(victim / "model.safetensors").items()}
    save_file(dict(reversed(other.items())), replacement, metadata={"format": "pt"})
    real_writer = executor.ShardedWriter

    def writer_after_replacing(*args, **kwargs):
        os.replace(replacement, victim / "model.safetensors")
        return real_writer(*args, **kwargs)

    recipe = write_recipe(linear(toy_models["coder"], victim))
    run_yaml(recipe, tmp_path / "expected", "--workers", 1, "--quiet")
    monkeypatch.setattr(executor, "ShardedWriter", writer_after_replacing)
    shutil.copytree(toy_models["math"], victim, dirs_exist_ok=True)
    result = run_yaml(recipe, tmp_path / "out", "--workers", 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert not replacement.exists()  # the replacement did happen
    expected = load_file(tmp_path / "expected" / "model-00001-of-00001.safetensors")
    merged = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    assert expected.keys() == merged.keys()
    assert all(torch.equal(expected[name], merged[name]) for name in expected)


# --- recipes -------------------------------------------------------------------------------------------------


def test_duplicate_keys_name_the_key_and_line(tmp_path, toy_models, write_recipe, run_yaml):
    text = f"merge_method: linear\nmodels:\n  - model: {toy_models['coder']}\n    parameters: {{weight: 1}}\n"
    recipe = write_recipe(text + "merge_method: ties\n")
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(recipe, out), out, "duplicate key 'merge_method'", "line 5", "line 1")
    nested = write_recipe(text.replace("{weight: 1}", "{weight: 1, weight: 2}"), "nested.yml")
    assert_clean_failure(run_yaml(nested, out), out, "duplicate key 'weight'", "line 4")


def test_merge_keys_may_override_without_being_duplicates(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text("defaults: &d {weight: 1, density: 0.5}\nmodel:\n  <<: *d\n  weight: 2\n")
    assert read_recipe(path)[0]["model"] == {"weight": 2, "density": 0.5}


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"merge_method: linear\nmodels: \xff\xfe\n", "line 2: not UTF-8"),
        (b"a: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deeply"),
        ("".join(f"{' ' * i}k:\n" for i in range(3000)).encode(), "nested too deeply"),
    ],
    ids=["not UTF-8", "50,000 deep flow", "3,000 deep block"],
)
def test_unreadable_recipes_are_one_line(content, fragment, tmp_path, run_yaml):
    recipe = tmp_path / "recipe.yml"
    recipe.write_bytes(content)
    out = tmp_path / "out"
    assert_clean_failure(run_yaml(recipe, out), out, fragment)


def test_a_4mb_recipe_path_is_one_line(tmp_path, run_yaml):
    out = tmp_path / "out"
    line = assert_clean_failure(run_yaml("r" * 4_000_000, out), out, "the path is too long")
    assert len(line) < 300


def test_recipes_are_read_from_a_pipe(toy_models, tmp_path):
    """`moemerge-moe <(cat recipe.yml) out` and the same for moemerge-yaml: a pipe is read like a file."""
    from click.testing import CliRunner

    from moemerge.cli.moe_command import main as moe_main
    from moemerge.cli.yaml_command import main as yaml_main

    moe_text = (
        f"base_model: {toy_models['mistral_base']}\ngate_mode: random\nexperts:\n"
        f"  - source_model: {toy_models['mistral_ft']}\n  - source_model: {toy_models['mistral_base']}\n"
    )
    yaml_text = f"merge_method: linear\nmodels:\n  - model: {toy_models['coder']}\n    parameters: {{weight: 1}}\n"
    for main, text in ((moe_main, moe_text), (yaml_main, yaml_text)):
        read_end, write_end = os.pipe()
        os.write(write_end, text.encode())
        os.close(write_end)
        out = tmp_path / f"out-{main.name}"
        try:
            result = CliRunner().invoke(main, [f"/dev/fd/{read_end}", str(out), "--dry-run"], catch_exceptions=False)
        finally:
            os.close(read_end)
        assert result.exit_code == 0, result.output


def test_a_recipe_that_is_a_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read recipe"):
        read_recipe(tmp_path)


def test_a_model_path_that_is_too_long_is_model_not_found():
    from moemerge.io.model_ref import resolve_model

    with pytest.raises(ModelNotFoundError, match="File name too long"):
        resolve_model("m" * 5000)


# --- numbers -------------------------------------------------------------------------------------------------


def _with_nan(source: Path, target: Path, name: str = "model.layers.1.mlp.down_proj.weight") -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors[name][0, 0] = float("nan")
    tensors[name][1, 1] = float("inf")
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_nan_in_an_input_is_named_and_a_nonfinite_output_is_an_error(toy_models, write_recipe, run_yaml, tmp_path):
    broken = _with_nan(toy_models["math"], tmp_path / "nan-model")
    recipe = write_recipe(linear(toy_models["coder"], broken))
    out = tmp_path / "out"
    result = run_yaml(recipe, out, "--quiet")
    assert_clean_failure(result, out, "'model.layers.1.mlp.down_proj.weight'", "NaN or Inf", "--allow-nonfinite")
    assert "input tensor 'model.layers.1.mlp.down_proj.weight' holds 2 NaN or Inf values" in result.stderr
    assert str(broken) in result.stderr
    allowed = run_yaml(recipe, out, "--quiet", "--allow-nonfinite")
    assert allowed.exit_code == 0, allowed.output
    assert "written anyway" in allowed.stderr
    merged = load_file(out / "model-00001-of-00001.safetensors")["model.layers.1.mlp.down_proj.weight"]
    assert merged[0, 0].isnan() and merged[1, 1].isinf()


def test_float16_overflow_at_out_dtype_is_an_error(toy_models, write_recipe, run_yaml, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(toy_models["coder"]), "parameters": {"weight": 1e9}}],
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": "float16",
    }
    out = tmp_path / "out"
    result = run_yaml(write_recipe(recipe), out, "--quiet")
    assert_clean_failure(result, out, "overflows float16", "65504")
    assert "NaN or Inf values" not in result.stderr  # the inputs were fine: no input warning


def test_checked_output_tells_overflow_from_nan():
    from moemerge.executor import checked_output
    from moemerge.io.writer import TensorSpec

    spec = TensorSpec("w", (3,), torch.float16)
    assert torch.equal(checked_output(spec, torch.tensor([1.0, 2.0, 3.0]), False), torch.tensor([1.0, 2.0, 3.0]).half())
    with pytest.raises(TensorError, match="'w' overflows float16 .* in 1 of 3"):
        checked_output(spec, torch.tensor([1.0, 7e4, 3.0]), False)
    with pytest.raises(TensorError, match="'w' has NaN or Inf values in 1 of 3"):
        checked_output(spec, torch.tensor([float("nan"), 2.0, 3.0]), False)
    assert checked_output(spec, torch.tensor([1.0, 7e4, 3.0]), True)[1].isinf()
