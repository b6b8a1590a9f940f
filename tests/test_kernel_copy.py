"""Kernel-side copies (`os.copy_file_range`): the bytes of the read + write path, a clean fallback, and only
for outputs that are an input tensor unchanged."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from moe_support import mistral_recipe
from safetensors.torch import load_file, save_file
from split_fixtures import run_split

from moemerge.errors import OutputError, TensorError
from moemerge.executor import OutputTensor, write_tensors
from moemerge.io.loader import LazyModel
from moemerge.io.writer import ShardedWriter, TensorSpec

pytest_plugins = ("moe_fixtures",)

REAL_COPY = os.copy_file_range
DENSE_DOWN = "model.layers.1.mlp.down_proj.weight"
EXPERT_DOWN = "model.layers.1.block_sparse_moe.experts.2.w2.weight"  # the story expert's down projection


class CopySpy:
    """Stands in for os.copy_file_range: counts calls; copies at most `chunk` bytes a call, or fails with `fail`."""

    def __init__(self, chunk: int | None = None, fail: int | None = None, short: bool = False):
        self.chunk, self.fail, self.short, self.calls = chunk, fail, short, 0

    def __call__(self, source: int, target: int, count: int, source_offset: int, target_offset: int) -> int:
        self.calls += 1
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        if self.short:
            return 0
        return REAL_COPY(source, target, min(count, self.chunk or count), source_offset, target_offset)


def output_files(folder: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix in (".safetensors", ".json")
    }


def run_with(monkeypatch, spy: CopySpy | None, run) -> None:
    """Run with `spy` as os.copy_file_range, or (None) with no such call at all: the read + pwrite path."""
    with monkeypatch.context() as patch:
        if spy is None:
            patch.delattr(os, "copy_file_range")
        else:
            patch.setattr(os, "copy_file_range", spy)
        run()


def moe(run_moe, moe_recipe_file, recipe: dict, out: Path, *args: object):
    return run_moe(moe_recipe_file(recipe), out, "--quiet", "--out-shard-size", "200K", *args)


def test_moe_copies_give_the_fallback_bytes_and_load(moe_models, moe_recipe_file, run_moe, tmp_path, monkeypatch):
    recipe = mistral_recipe(moe_models, gate_mode="random")  # float32 toys, float32 output: copies
    recipe["experts"][2]["residual_scale"] = 0.5  # its down projections are computed, the rest copied
    outs = {name: tmp_path / name for name in ("chunked", "fallback", "exdev")}
    chunked, exdev = CopySpy(chunk=4096), CopySpy(fail=errno.EXDEV)

    def run(name: str):
        return lambda: assemble_ok(moe(run_moe, moe_recipe_file, recipe, outs[name], "--workers", 2))

    run_with(monkeypatch, chunked, run("chunked"))  # short copies: the writer loops until the range is placed
    run_with(monkeypatch, None, run("fallback"))
    run_with(monkeypatch, exdev, run("exdev"))
    files = output_files(outs["fallback"])
    assert len([name for name in files if name.endswith(".safetensors")]) > 1  # sharded
    assert output_files(outs["chunked"]) == files and output_files(outs["exdev"]) == files
    # 4 layers x 12 expert projections (4 scaled) + attention, norms, embeddings: many copies, each in chunks
    assert chunked.calls > 100
    assert exdev.calls == 1  # another filesystem: asked once, then every tensor is read and written
    tensors = {
        name: tensor for path in outs["chunked"].glob("*.safetensors") for name, tensor in load_file(path).items()
    }
    story = load_file(moe_models["story"] / "model.safetensors")
    assert torch.equal(tensors["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                       load_file(moe_models["math"] / "model.safetensors")[DENSE_DOWN])  # fmt: skip
    torch.testing.assert_close(tensors[EXPERT_DOWN], story[DENSE_DOWN] * 0.5)
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(outs["chunked"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def assemble_ok(result) -> None:
    assert result.exit_code == 0, result.output


def test_a_dtype_change_is_never_a_kernel_copy(moe_models, moe_recipe_file, run_moe, tmp_path, monkeypatch):
    spy = CopySpy()
    out = tmp_path / "bf16"
    recipe = mistral_recipe(moe_models, gate_mode="random", dtype="bfloat16")  # float32 inputs
    run_with(monkeypatch, spy, lambda: assemble_ok(moe(run_moe, moe_recipe_file, recipe, out)))
    assert spy.calls == 0
    tensors = {name: tensor for path in out.glob("*.safetensors") for name, tensor in load_file(path).items()}
    story = load_file(moe_models["story"] / "model.safetensors")
    assert torch.equal(tensors[EXPERT_DOWN], story[DENSE_DOWN].to(torch.bfloat16))


def _with_nan(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors[DENSE_DOWN][0, 0] = float("nan")
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_copies_are_not_screened_but_computed_tensors_are(moe_models, moe_recipe_file, run_moe, tmp_path):
    broken = _with_nan(moe_models["story"], tmp_path / "nan-story")
    recipe = mistral_recipe(moe_models, gate_mode="random")
    recipe["experts"][2]["source_model"] = str(broken)
    copied = tmp_path / "copied"
    assemble_ok(moe(run_moe, moe_recipe_file, recipe, copied))  # the user's tensor, unchanged: written as it is
    tensors = {name: tensor for path in copied.glob("*.safetensors") for name, tensor in load_file(path).items()}
    assert tensors[EXPERT_DOWN][0, 0].isnan()
    recipe["experts"][2]["residual_scale"] = 0.5  # now computed: screened, one-line error naming the tensor
    scaled = tmp_path / "scaled"
    result = moe(run_moe, moe_recipe_file, recipe, scaled)
    assert result.exit_code != 0
    assert f"'{EXPERT_DOWN}' has NaN or Inf values" in result.output and "Traceback" not in result.output
    assert not scaled.exists()


def frankenmerge(models: dict[str, Path], dtype: str, **parameters: float) -> dict:
    return {
        "merge_method": "passthrough",
        "dtype": dtype,
        "slices": [
            {"sources": [{"model": str(models["coder"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(models["math"]), "layer_range": [1, 3], "parameters": parameters}]},
        ],
    }


def test_passthrough_slices_copy_the_fallback_bytes(toy_models, write_recipe, run_yaml, tmp_path, monkeypatch):
    spy = CopySpy()
    recipe = write_recipe(frankenmerge(toy_models, "float32"))
    outs = {name: tmp_path / name for name in ("copied", "fallback")}

    def run(name: str):
        return lambda: assemble_ok(run_yaml(recipe, outs[name], "--quiet", "--out-shard-size", "300K"))

    run_with(monkeypatch, spy, run("copied"))
    run_with(monkeypatch, None, run("fallback"))
    assert spy.calls > 0 and output_files(outs["copied"]) == output_files(outs["fallback"])
    # a math dtype that cannot hold the inputs (float32 toys, bfloat16 math) is computed, never copied
    bf16, scaled = CopySpy(), CopySpy()
    other = write_recipe(frankenmerge(toy_models, "bfloat16"), name="bf16.yml")
    run_with(monkeypatch, bf16, lambda: assemble_ok(run_yaml(other, tmp_path / "bf16", "--quiet")))
    assert bf16.calls == 0
    # a scaled slice is computed; the other slice and the tensors outside the layers are still copies
    other = write_recipe(frankenmerge(toy_models, "float32", scale=0.5), name="scaled.yml")
    run_with(monkeypatch, scaled, lambda: assemble_ok(run_yaml(other, tmp_path / "scaled", "--quiet")))
    merged = load_file(tmp_path / "scaled" / "model-00001-of-00001.safetensors")
    math = load_file(toy_models["math"] / "model.safetensors")
    assert scaled.calls > 0 and torch.equal(merged["model.layers.2.mlp.down_proj.weight"], math[DENSE_DOWN] * 0.5)


def test_split_copies_give_the_fallback_bytes(split_models, calibrated_prune, tmp_path, monkeypatch):
    usage = calibrated_prune / "usage.json"
    for mode, args in (("expert", ("--expert", 2)), ("prune", ("--prune-to", 2, "--usage", usage))):
        spy = CopySpy()
        copied, fallback = tmp_path / f"{mode}-copied", tmp_path / f"{mode}-fallback"
        run_with(
            monkeypatch, spy, lambda out=copied, args=args: assemble_ok(run_split(split_models["mixtral"], out, *args))
        )
        run_with(
            monkeypatch,
            None,
            lambda out=fallback, args=args: assemble_ok(run_split(split_models["mixtral"], out, *args)),
        )
        assert spy.calls > 0, mode
        assert output_files(copied) == output_files(fallback), mode


def test_a_shard_rewritten_in_place_is_reported_after_a_copy(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.arange(4.0)}, folder / "model.safetensors")
    model = LazyModel(folder)
    path = folder / "model.safetensors"
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(bytes(4))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    output = OutputTensor(TensorSpec("a", (4,), torch.float32), lambda: model.read("a"), copy_of=(model, "a"))
    (tmp_path / "out").mkdir()
    with pytest.raises(TensorError, match="changed on disk while moemerge was reading it"):
        write_tensors(tmp_path / "out", [output], max_shard_bytes=10**6, progress=False, workers=1)


def test_place_range_falls_back_or_reports(tmp_path, monkeypatch):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(16)))
    fd = os.open(source, os.O_RDONLY)
    try:
        spec = TensorSpec("w", (4, 2), torch.float16)
        writer = ShardedWriter(tmp_path, [spec], 10**6)
        with pytest.raises(RuntimeError, match="do not fit"):
            writer.place_range("w", fd, 0, 6)  # not whole rows
        monkeypatch.setattr(os, "copy_file_range", CopySpy(short=True))
        assert not writer.place_range("w", fd, 0, 16)  # the source ends early: the caller reads it itself
        monkeypatch.setattr(os, "copy_file_range", CopySpy(fail=errno.EIO))
        assert not writer.place_range("w", fd, 0, 16) and writer._kernel_copy  # not a lasting answer: asked again
        monkeypatch.setattr(os, "copy_file_range", CopySpy(fail=errno.ENOSPC))
        with pytest.raises(OutputError, match="disk full"):
            writer.place_range("w", fd, 0, 16)
        monkeypatch.setattr(os, "copy_file_range", REAL_COPY)
        assert writer.place_range("w", fd, 8, 8, first_row=2) and writer.place_range("w", fd, 0, 8)
        writer.close()
    finally:
        os.close(fd)
    shard = (tmp_path / "model-00001-of-00001.safetensors").read_bytes()
    assert shard[-16:] == bytes(range(16))


def test_only_plain_safetensors_ranges_are_offered_for_copies(toy_models, lora_models):
    adapted = LazyModel.open(f"{lora_models['base']}+{lora_models['plain']}")
    changed, untouched = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert adapted.adapter.changes.get(changed) and not adapted.adapter.changes.get(untouched)
    assert adapted.stored_range(changed) is None  # the adapter's update is not in the file
    stored = adapted.stored_range(untouched, rows=(2, 5))
    assert stored is not None and stored.shape == (3, *adapted.shape(untouched)[1:])
    assert os.pread(stored.fd, stored.length, stored.start) == adapted.read(untouched, rows=(2, 5)).numpy().tobytes()
    assert LazyModel(toy_models["coder_bin"]).stored_range(untouched) is None  # a pickled .bin: read, not copied
