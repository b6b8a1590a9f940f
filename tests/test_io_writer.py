"""The sharded writer: files safetensors reads back byte-exactly, a correct index, shard splitting, errors."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moemerge.errors import OutputError
from moemerge.io.writer import INDEX_NAME, ShardedWriter, TensorSpec, assign_shards


def seeded_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(40, 8, generator=generator).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=generator),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=generator).half(),
        "model.layers.0.counter": torch.arange(5, dtype=torch.int64),
        "model.layers.0.mask": torch.tensor([True, False, True]),
        "lm_head.weight": torch.randn(40, 8, generator=generator).to(torch.bfloat16),
    }


def write_all(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, order=None) -> None:
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(folder, specs, max_shard_bytes)
    for name in order or tensors:
        writer.write(name, tensors[name])
    writer.close()


def read_back(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_NAME).read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(folder / file, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_safetensors_reads_back_every_tensor_byte_exactly(tmp_path: Path) -> None:
    tensors = seeded_tensors()
    write_all(tmp_path, tensors, max_shard_bytes=10**9)
    back = read_back(tmp_path)
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert as_bytes(back[name]) == as_bytes(tensor), name


def test_index_maps_every_tensor_to_the_shard_holding_it_and_totals_the_bytes(tmp_path: Path) -> None:
    tensors = seeded_tensors()
    write_all(tmp_path, tensors, max_shard_bytes=700)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / file, framework="pt") as handle:
            assert name in handle.keys()
    shard_files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert shard_files == sorted(set(index["weight_map"].values()))
    count = len(shard_files)
    assert shard_files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def test_shards_split_at_the_size_limit_in_plan_order_and_a_large_tensor_gets_its_own() -> None:
    specs = [TensorSpec(f"t{i}", (n,), torch.uint8) for i, n in enumerate([300, 300, 300, 1000, 100, 50])]
    shards = assign_shards(specs, 700)
    assert [[spec.name for spec in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert assign_shards([], 700) == []


def test_shard_data_sizes_stay_under_the_limit_on_disk(tmp_path: Path) -> None:
    tensors = {f"layer.{i}.weight": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    write_all(tmp_path, tensors, max_shard_bytes=1000)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 5  # two 400-byte tensors fit under 1000, a third does not
    for file in files:
        header_size = int.from_bytes(file.read_bytes()[:8], "little")
        assert file.stat().st_size - 8 - header_size <= 1000
    assert all(torch.equal(read_back(tmp_path)[n], t) for n, t in tensors.items())


def test_out_of_order_and_concurrent_writes_give_the_same_files(tmp_path: Path) -> None:
    tensors = seeded_tensors()
    write_all(tmp_path / "in_order", tensors, max_shard_bytes=700)
    write_all(tmp_path / "reversed", tensors, max_shard_bytes=700, order=list(reversed(tensors)))
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    threaded = tmp_path / "threaded"
    threaded.mkdir()
    writer = ShardedWriter(threaded, specs, 700)
    threads = [threading.Thread(target=writer.write, args=(name, tensor)) for name, tensor in tensors.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    for other in ("reversed", "threaded"):
        for file in (tmp_path / "in_order").iterdir():
            assert (tmp_path / other / file.name).read_bytes() == file.read_bytes(), (other, file.name)


def test_close_names_a_tensor_that_was_never_written(tmp_path: Path) -> None:
    tensors = seeded_tensors()
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, 10**9)
    for name in list(tensors)[1:]:
        writer.write(name, tensors[name])
    with pytest.raises(RuntimeError, match="model.embed_tokens.weight"):
        writer.close()
    writer.abort()
    assert not (tmp_path / INDEX_NAME).exists()


def test_a_tensor_of_the_wrong_shape_or_dtype_is_refused(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [TensorSpec("w", (2, 3), torch.float32)], 10**9)
    with pytest.raises(RuntimeError, match="w: computed"):
        writer.write("w", torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="w: computed"):
        writer.write("w", torch.zeros(2, 3, dtype=torch.float16))
    writer.abort()


def test_a_full_disk_while_writing_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ShardedWriter(tmp_path, [TensorSpec("w", (4,), torch.float32)], 10**9)

    def full_disk(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OutputError, match="disk full"):
        writer.write("w", torch.ones(4))
    writer.abort()


def test_a_full_disk_at_reservation_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(OutputError, match="disk full"):
        ShardedWriter(tmp_path, [TensorSpec("w", (4,), torch.float32)], 10**9)


def test_a_tensor_written_in_row_blocks_in_any_order_is_byte_identical(tmp_path: Path) -> None:
    tensors = seeded_tensors()
    write_all(tmp_path / "whole", tensors, max_shard_bytes=300)
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    (tmp_path / "blocks").mkdir()
    writer = ShardedWriter(tmp_path / "blocks", specs, max_shard_bytes=300)
    embed = tensors["model.embed_tokens.weight"]
    for start, stop in ((30, 40), (0, 13), (13, 30)):  # out of order, uneven
        writer.write("model.embed_tokens.weight", embed[start:stop], first_row=start)
    for name, tensor in tensors.items():
        if name != "model.embed_tokens.weight":
            writer.write(name, tensor)
    writer.close()
    whole = sorted((tmp_path / "whole").iterdir())
    assert [p.name for p in whole] == sorted(p.name for p in (tmp_path / "blocks").iterdir())
    for path in whole:
        assert path.read_bytes() == (tmp_path / "blocks" / path.name).read_bytes(), path.name


def test_a_missing_row_block_or_a_misfit_block_is_caught(tmp_path: Path) -> None:
    embed = seeded_tensors()["model.embed_tokens.weight"]
    writer = ShardedWriter(tmp_path, [TensorSpec("embed", (40, 8), torch.bfloat16)], max_shard_bytes=10**9)
    writer.write("embed", embed[:20], first_row=0)
    with pytest.raises(RuntimeError, match="at row 30"):
        writer.write("embed", embed[:20], first_row=30)  # runs past row 40
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("embed", embed[20:, :4], first_row=20)  # wrong row width
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    writer.abort()
