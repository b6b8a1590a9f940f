"""The executor: every planned tensor written once, the same bytes for any worker count, memory within budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import read_tensors

from moemerge.executor import OutputTensor, working_bytes, write_tensors
from moemerge.io.writer import INDEX_NAME, TensorSpec

SHAPES = [(64, 48), (48,), (200, 16), (16, 16), (5, 7, 3), (128, 32)]


def seeded_outputs(count: int = 24) -> list[OutputTensor]:
    """Outputs whose math has reductions (norms, dot products), where thread scheduling could change bits."""

    def produce(index: int, shape: tuple[int, ...]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(index)
        first, second = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        cosine = (first * second).sum() / (first.norm() * second.norm())
        return (first * cosine + second * (1 - cosine)).to(torch.bfloat16)

    return [
        OutputTensor(
            TensorSpec(f"model.layers.{i}.weight", SHAPES[i % len(SHAPES)], torch.bfloat16),
            lambda i=i: produce(i, SHAPES[i % len(SHAPES)]),
        )
        for i in range(count)
    ]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_output_is_byte_identical_with_one_worker_or_many(tmp_path: Path) -> None:
    results = {}
    for workers, max_memory in ((1, None), (2, None), (4, 10**9), (3, 20_000)):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        write_tensors(
            folder, seeded_outputs(), max_shard_bytes=30_000, progress=False, workers=workers, max_memory=max_memory
        )
        results[workers] = folder_bytes(folder)
    assert len(results[1]) > 2  # several shards and the index
    assert results[2] == results[1] and results[4] == results[1] and results[3] == results[1]


def test_every_tensor_is_written_with_its_planned_dtype(tmp_path: Path) -> None:
    outputs = [
        OutputTensor(TensorSpec("a", (3, 2), torch.float16), lambda: torch.arange(6.0).reshape(3, 2)),
        OutputTensor(TensorSpec("b", (4,), torch.bfloat16), lambda: torch.tensor([1.0, -2.0, 0.5, 3.25])),
    ]
    written = write_tensors(tmp_path, outputs, max_shard_bytes=10**9, progress=False, workers=2)
    assert written == 6 * 2 + 4 * 2
    tensors = read_tensors(tmp_path)
    assert tensors["a"].dtype == torch.float16 and torch.equal(tensors["a"], torch.arange(6.0).reshape(3, 2).half())
    assert torch.equal(tensors["b"], torch.tensor([1.0, -2.0, 0.5, 3.25], dtype=torch.bfloat16))


class Concurrency:
    """Counts how many `produce` calls run at the same moment."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def output(self, name: str, numel: int) -> OutputTensor:
        def produce() -> torch.Tensor:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.02)  # long enough that an unbudgeted scheduler would overlap tensors
            with self.lock:
                self.running -= 1
            return torch.zeros(numel)

        return OutputTensor(TensorSpec(name, (numel,), torch.float32), produce)


def test_tensors_start_only_while_their_estimated_memory_fits_the_budget(tmp_path: Path) -> None:
    concurrency = Concurrency()
    outputs = [concurrency.output(f"t{i}", 1000) for i in range(8)]
    (tmp_path / "tight").mkdir()
    (tmp_path / "roomy").mkdir()
    one_tensor = working_bytes(outputs[0])
    write_tensors(tmp_path / "tight", outputs, max_shard_bytes=10**9, progress=False, workers=4, max_memory=one_tensor)
    assert concurrency.most == 1

    roomy = Concurrency()
    outputs = [roomy.output(f"t{i}", 1000) for i in range(8)]
    write_tensors(tmp_path / "roomy", outputs, max_shard_bytes=10**9, progress=False, workers=4, max_memory=10**9)
    assert 1 < roomy.most <= 4


def test_a_tensor_larger_than_the_budget_still_runs_alone(tmp_path: Path) -> None:
    concurrency = Concurrency()
    outputs = [concurrency.output("small", 10), concurrency.output("huge", 100_000), concurrency.output("small2", 10)]
    write_tensors(
        tmp_path, outputs, max_shard_bytes=10**9, progress=False, workers=3, max_memory=working_bytes(outputs[0])
    )
    assert torch.equal(read_tensors(tmp_path)["huge"], torch.zeros(100_000))
    assert concurrency.most == 1


def test_an_error_stops_the_merge_and_leaves_no_index(tmp_path: Path) -> None:
    produced: list[str] = []

    def produce(name: str) -> torch.Tensor:
        if name == "t3":
            raise ValueError("t3 cannot be merged")
        produced.append(name)
        return torch.zeros(4)

    outputs = [OutputTensor(TensorSpec(f"t{i}", (4,), torch.float32), lambda i=i: produce(f"t{i}")) for i in range(50)]
    for workers in (1, 2):
        folder = tmp_path / str(workers)
        folder.mkdir()
        produced.clear()
        with pytest.raises(ValueError, match="t3 cannot be merged"):
            write_tensors(folder, outputs, max_shard_bytes=10**9, progress=False, workers=workers)
        assert not (folder / INDEX_NAME).exists()
        assert len(produced) < 49  # the remaining tensors were cancelled, not computed


class RecordingModel:
    """Stands in for a LazyModel: records read-ahead requests."""

    def __init__(self) -> None:
        self.prefetched: list[str] = []

    def has(self, name: str) -> bool:
        return True

    def nbytes(self, name: str) -> int:
        return 400

    def prefetch(self, name: str) -> None:
        self.prefetched.append(name)


def test_inputs_are_read_ahead_in_plan_order_and_counted_in_the_estimate(tmp_path: Path) -> None:
    model = RecordingModel()
    outputs = [
        OutputTensor(TensorSpec(f"t{i}", (100,), torch.float32), lambda: torch.ones(100), sources=((model, f"in{i}"),))
        for i in range(6)
    ]
    write_tensors(tmp_path, outputs, max_shard_bytes=10**9, progress=False, workers=1)
    assert model.prefetched == [f"in{i}" for i in range(6)]
    # 400 bytes read + 400 after the cast to float32 + 3 float32 temporaries + the 400-byte output
    assert working_bytes(outputs[0]) == 400 + 400 + 3 * 400 + 400
    given = OutputTensor(TensorSpec("g", (100,), torch.bfloat16), lambda: torch.ones(100), input_bytes=10_000)
    assert working_bytes(given) == 10_000 + 10_000 + 3 * 400 + 200


def test_cli_output_is_byte_identical_across_workers_and_budgets(toy_models, write_recipe, run_yaml, tmp_path) -> None:
    recipe = write_recipe(
        {
            "merge_method": "ties",
            "base_model": str(toy_models["base"]),
            "models": [
                {"model": str(toy_models[name]), "parameters": {"weight": 1.0, "density": 0.5}}
                for name in ("coder", "math", "story")
            ],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }
    )
    outputs = {}
    for label, options in (("serial", ["--workers", "1"]), ("parallel", ["--workers", "3", "--max-memory", "50M"])):
        result = run_yaml(recipe, tmp_path / label, "--quiet", "--out-shard-size", "100K", *options)
        assert result.exit_code == 0, result.output
        outputs[label] = {p.name: p.read_bytes() for p in (tmp_path / label).glob("*.safetensors")}
    assert len(outputs["serial"]) > 1
    assert outputs["parallel"] == outputs["serial"]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "passthrough"])
def test_elementwise_methods_merged_in_row_blocks_give_the_same_bytes(
    toy_models, write_recipe, run_yaml, tmp_path, monkeypatch, method
) -> None:
    import moemerge.dense_merge

    names = ("coder",) if method == "passthrough" else ("coder", "math", "story")
    models = [{"model": str(toy_models[name]), "parameters": {"weight": 0.7}} for name in names]
    if method == "passthrough":
        models[0]["parameters"] = {"scale": 0.7}
    recipe = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    if method == "task_arithmetic":
        recipe["base_model"] = str(toy_models["base"])
    config = write_recipe(recipe)
    outputs = {}
    # toy tensors hold 384 × 64 or 128 × 64 entries: 1000-entry blocks split every matrix into many blocks
    for label, block in (("whole", 10**9), ("blocks", 1000)):
        monkeypatch.setattr(moemerge.dense_merge, "BLOCK_ELEMENTS", block)
        result = run_yaml(config, tmp_path / label, "--quiet", "--workers", "2")
        assert result.exit_code == 0, result.output
        outputs[label] = {p.name: p.read_bytes() for p in (tmp_path / label).glob("*.safetensors")}
    assert outputs["blocks"] == outputs["whole"]


def test_row_blocks_cover_every_row_once_and_only_for_elementwise_methods() -> None:
    from types import SimpleNamespace

    from moemerge.dense_merge import BLOCK_ELEMENTS, row_blocks

    def plan(elementwise: bool):
        return SimpleNamespace(method=SimpleNamespace(elementwise=elementwise))

    def merge(shape, fit_vocab=False):
        return SimpleNamespace(spec=TensorSpec("t", shape, torch.bfloat16), fit_vocab=fit_vocab, vocab=None)

    big = (32000, 4096)
    blocks = row_blocks(plan(True), merge(big))
    assert blocks[0][0] == 0 and blocks[-1][1] == 32000
    assert all(a[1] == b[0] for a, b in zip(blocks[:-1], blocks[1:], strict=True))  # contiguous, no overlap
    assert all((stop - start) * 4096 <= BLOCK_ELEMENTS for start, stop in blocks)
    assert row_blocks(plan(False), merge(big)) == [None]  # TIES, SLERP, DARE need the whole tensor
    assert row_blocks(plan(True), merge(big, fit_vocab=True)) == [None]
    assert row_blocks(plan(True), merge((4096,))) == [None]
    assert row_blocks(plan(True), merge((64, 64))) == [None]
    assert row_blocks(plan(True), merge((3, BLOCK_ELEMENTS))) == [(0, 1), (1, 2), (2, 3)]  # a row over the size
