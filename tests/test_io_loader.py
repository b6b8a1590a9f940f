"""The lazy loader: exact tensors from safetensors (pread, any thread), weights-only `.bin`, clear refusals."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moemerge.errors import ModelNotFoundError, TensorError
from moemerge.io.loader import LazyModel


def reference_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "model.embed_tokens.weight": torch.randn(30, 6, generator=generator).to(torch.bfloat16),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 10, 6, generator=generator),
        "model.layers.0.input_layernorm.weight": torch.randn(6, generator=generator).half(),
        "model.layers.0.position_ids": torch.arange(7, dtype=torch.int32),
        "model.norm.weight": torch.ones(6, dtype=torch.float64),
        "empty": torch.zeros(0, 6),
    }


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """Two safetensors shards plus an index, written by safetensors itself."""
    tensors = reference_tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, tmp_path / file)
        weight_map |= dict.fromkeys(shard_names, file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def test_every_tensor_reads_back_exactly_with_its_shape_and_dtype(sharded: Path) -> None:
    model = LazyModel(sharded)
    for name, tensor in reference_tensors().items():
        assert model.shape(name) == tuple(tensor.shape)
        assert model.dtype(name) == tensor.dtype
        assert model.nbytes(name) == tensor.numel() * tensor.element_size()
        read = model.read(name)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), name


def test_read_casts_and_read_slice_takes_one_row_of_the_first_dimension(sharded: Path) -> None:
    model = LazyModel(sharded)
    expected = reference_tensors()
    embed = model.read("model.embed_tokens.weight", dtype=torch.float32)
    assert embed.dtype == torch.float32 and torch.equal(embed, expected["model.embed_tokens.weight"].float())
    fused = expected["model.layers.0.mlp.experts.gate_up_proj"]
    for expert in range(4):
        assert torch.equal(model.read_slice("model.layers.0.mlp.experts.gate_up_proj", expert), fused[expert])
    with pytest.raises(TensorError, match="no index 4"):
        model.read_slice("model.layers.0.mlp.experts.gate_up_proj", 4)


def test_tensors_read_from_many_threads_at_once_are_exact(sharded: Path) -> None:
    model = LazyModel(sharded)
    expected = reference_tensors()
    mismatches: list[str] = []

    def read_all() -> None:
        for _ in range(20):
            for name, tensor in expected.items():
                model.prefetch(name)
                if not torch.equal(model.read(name), tensor):
                    mismatches.append(name)

    threads = [threading.Thread(target=read_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []


def test_a_read_tensor_owns_its_memory_so_methods_may_change_it_in_place(sharded: Path) -> None:
    model = LazyModel(sharded)
    first = model.read("model.norm.weight")
    first.mul_(3)
    assert torch.equal(model.read("model.norm.weight"), torch.ones(6, dtype=torch.float64))


def test_unknown_tensor_missing_shard_and_truncated_file_are_clear_errors(sharded: Path) -> None:
    model = LazyModel(sharded)
    with pytest.raises(TensorError, match="has no tensor 'nope'"):
        model.read("nope")
    shard = sharded / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 8])
    with pytest.raises(TensorError, match="model-00002-of-00002.safetensors is not a valid .* data section"):
        LazyModel(sharded)  # a truncated shard is refused when it is opened, before any tensor is read
    shard.unlink()
    with pytest.raises(TensorError, match="model-00002-of-00002.safetensors.*missing"):
        LazyModel(sharded).read("model.norm.weight")


def test_a_corrupt_header_is_a_tensor_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(TensorError, match=r"model.safetensors is not a valid safetensors file: header length"):
        LazyModel(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(TensorError, match="model.safetensors is not a valid safetensors file"):
        LazyModel(tmp_path)


def test_a_folder_without_weights_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no .safetensors or .bin weights"):
        LazyModel(tmp_path)


def test_a_plain_bin_state_dict_loads_weights_only(tmp_path: Path) -> None:
    tensors = reference_tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    model = LazyModel(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(model.read(name), tensor)
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(model.read_slice(fused, 2), tensors[fused][2])


class PlantsAMarker:
    """Unpickling this object would open (create) a file: code from a checkpoint running."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_bin_is_refused_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran.txt"
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"model.norm.weight": torch.ones(3), "payload": PlantsAMarker(marker)}, folder / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(TensorError, match="refusing pytorch_model.bin"):
        LazyModel(folder)
    assert not marker.exists()


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_rows_reads_one_block_of_rows(sharded: Path, tmp_path: Path, weights_format: str) -> None:
    tensors = reference_tensors()
    folder = sharded
    if weights_format == "bin":
        folder = tmp_path / "bin"
        folder.mkdir()
        torch.save(tensors, folder / "pytorch_model.bin")
    model = LazyModel(folder)
    embed, fused = "model.embed_tokens.weight", "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(model.read(embed, rows=(7, 19)), tensors[embed][7:19])
    assert torch.equal(model.read(embed, rows=(29, 30)), tensors[embed][29:])
    block = model.read(fused, dtype=torch.float64, rows=(1, 3))
    assert block.dtype == torch.float64 and torch.equal(block, tensors[fused][1:3].double())


def test_rows_outside_the_tensor_are_a_tensor_error(sharded: Path) -> None:
    model = LazyModel(sharded)
    for rows in ((0, 31), (5, 5), (-1, 3)):
        with pytest.raises(TensorError, match="has no rows"):
            model.read("model.embed_tokens.weight", rows=rows)
