"""Compute planned output tensors and stream them into the sharded writer, within a memory budget.

Every command (dense merge, MoE assembly, expert extraction) ends the same way: a list of output
tensors whose names, shapes and dtypes are known, each with a function that produces it. This
module is the one place that runs those functions and writes the results.

The pipeline: while worker threads compute and write tensors (torch math and `os.pwrite` release the
GIL), the scheduler asks the kernel to read ahead the inputs of the tensors that come next. A tensor
starts only when its estimated working memory fits in the budget next to those already in flight, and
its memory is released as soon as it is written, so peak memory follows the budget and the largest
tensor, not the model. Each tensor is computed independently of the others, in the same way whatever
the worker count (one torch thread per tensor), so the output is byte-identical with one worker or many.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moemerge.errors import TensorError
from moemerge.finite import nonfinite_count
from moemerge.io.loader import LazyModel, ModelPool
from moemerge.io.writer import ShardedWriter, TensorSpec

log = logging.getLogger(__name__)

MATH_ITEMSIZE = 4  # methods compute in float32 unless the recipe asks for wider
WORK_COPIES = 3  # temporaries a method holds beside its inputs (deltas, masks, the result)
READ_AHEAD_BYTES = 512 * 10**6  # input bytes the kernel is asked to fetch ahead of the running tensors


@dataclass(frozen=True)
class OutputTensor:
    """One planned output tensor: what it is, how to compute it, and (optionally) what it reads."""

    spec: TensorSpec
    produce: Callable[[], torch.Tensor]
    sources: tuple[tuple[LazyModel, str], ...] = ()  # (model, tensor name) read by `produce`: read-ahead
    input_bytes: int = 0  # bytes `produce` reads, when not given by `sources`
    rows: tuple[int, int] | None = None  # produces only spec's rows [start, stop): one block of a large tensor
    checked: bool = False  # `produce` already returns spec's dtype screened by `checked_output`: not screened twice
    # (model, tensor) whose stored bytes (its `rows` for a block) are this output unchanged: same dtype and shape,
    # no transform. Placed by a kernel-side copy (`ShardedWriter.place_range`), unscreened: the user's own tensor,
    # as mergekit writes it too. `produce` stays the fallback and must give the same bytes.
    copy_of: tuple[LazyModel, str] | None = None

    @property
    def share(self) -> float:
        """The fraction of the tensor this output produces (1.0 unless it is a block of rows)."""
        return 1.0 if self.rows is None else (self.rows[1] - self.rows[0]) / self.spec.shape[0]


def default_max_memory() -> int:
    """A quarter of the machine's RAM, between 1 GB and 16 GB: room for a few large tensors in flight."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 10**9
    return min(max(total // 4, 10**9), 16 * 10**9)


def default_workers() -> int:
    """One worker per core available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def working_bytes(output: OutputTensor) -> int:
    """Estimated peak memory while producing and writing one tensor: inputs (as read and cast) + temporaries."""
    if output.copy_of is not None:  # kernel copy: nothing here; its fallback holds the bytes read and written
        return 2 * _output_bytes(output)
    numel = int(torch.Size(output.spec.shape).numel() * output.share)
    read = output.input_bytes
    if not read and output.sources:
        read = int(sum(model.nbytes(name) for model, name in output.sources) * output.share)
    source_count = len(output.sources) or 2
    cast = max(read, source_count * numel * MATH_ITEMSIZE)  # inputs after the cast to the math dtype
    return read + cast + WORK_COPIES * numel * MATH_ITEMSIZE + int(output.spec.nbytes * output.share)


def _output_bytes(output: OutputTensor) -> int:
    return round(output.spec.nbytes * output.share)


def _produce_and_write(writer: ShardedWriter, output: OutputTensor, allow_nonfinite: bool = False) -> None:
    if output.copy_of is not None and copy_stored(writer, output):
        return
    tensor = output.produce()
    written = tensor if output.checked else checked_output(output.spec, tensor, allow_nonfinite)
    writer.write(output.spec.name, written, first_row=output.rows[0] if output.rows else 0)


def copy_stored(writer: ShardedWriter, output: OutputTensor) -> bool:
    """Place an unchanged input tensor by a kernel-side copy of its checked byte range; False when it must be read
    and written instead (a `.bin` or adapted input, another dtype or shape, a kernel or filesystem that cannot)."""
    assert output.copy_of is not None
    model, name = output.copy_of
    spec, rows = output.spec, output.rows
    stored = model.stored_range(name, rows)
    shape = spec.shape if rows is None else (rows[1] - rows[0], *spec.shape[1:])
    if stored is None or stored.dtype != spec.dtype or stored.shape != shape:
        return False
    if not writer.place_range(spec.name, stored.fd, stored.start, stored.length, first_row=rows[0] if rows else 0):
        return False
    model.check_unchanged(name)  # after the copy, as after a read: a shard rewritten in place is an error
    return True


def checked_output(spec: TensorSpec, tensor: torch.Tensor, allow_nonfinite: bool) -> torch.Tensor:
    """The tensor in its output dtype; NaN or Inf in it (from the inputs, the math, or an overflow of a narrow
    dtype such as float16) is an error unless allowed, and then a warning."""
    written = tensor.to(spec.dtype)
    bad = nonfinite_count(written)
    if not bad:
        return written
    overflow = tensor.dtype != spec.dtype and nonfinite_count(tensor) < bad
    dtype = str(spec.dtype).removeprefix("torch.")
    cause = (
        f"overflows {dtype} (largest finite value {torch.finfo(spec.dtype).max:g})"
        if overflow
        else "has NaN or Inf values"
    )
    message = f"output tensor {spec.name!r} {cause} in {bad} of {written.numel()} entries"
    if not allow_nonfinite:
        raise TensorError(f"{message}; choose a wider dtype, or pass --allow-nonfinite to write it anyway")
    log.warning("%s (written anyway: --allow-nonfinite)", message)
    return written


class _ReadAhead:
    """Asks the kernel to fetch the inputs of upcoming tensors, up to a byte window ahead of the scheduler."""

    def __init__(self, outputs: Sequence[OutputTensor], window: int):
        self.outputs = outputs
        self.window = window
        self.next_index = 0
        self.issued: list[int] = [0] * len(outputs)  # bytes asked for per output
        self.asked: set[tuple[int, str]] = set()  # (model, tensor) already asked for: blocks share their sources

    def advance(self, current: int) -> None:
        ahead = sum(self.issued[current : self.next_index])
        while self.next_index < len(self.outputs) and ahead < self.window:
            output = self.outputs[self.next_index]
            for model, name in output.sources:
                if (id(model), name) in self.asked:
                    continue
                self.asked.add((id(model), name))
                try:
                    model.prefetch(name)
                except Exception:  # read-ahead is only a hint; the real read reports real errors
                    log.debug("read-ahead of %s failed", name, exc_info=True)
                self.issued[self.next_index] += model.nbytes(name) if model.has(name) else 0
            ahead += self.issued[self.next_index]
            self.next_index += 1


def write_tensors(
    folder: Path,
    outputs: Sequence[OutputTensor],
    *,
    max_shard_bytes: int,
    progress: bool = True,
    description: str = "merging",
    max_memory: int | None = None,
    workers: int | None = None,
    allow_nonfinite: bool = False,
) -> int:
    """Produce every output tensor and write it, `workers` at a time within `max_memory`; returns bytes written."""
    budget = max_memory or default_max_memory()
    workers = workers or default_workers()
    specs = list({output.spec.name: output.spec for output in outputs}.values())  # blocks of one tensor: one spec
    writer = ShardedWriter(folder, specs, max_shard_bytes)
    # progress in output bytes: blocks and tensors of every size count for what they weigh
    bar = tqdm(
        total=sum(spec.nbytes for spec in specs), desc=description, unit="B", unit_scale=True, disable=not progress
    )
    read_ahead = _ReadAhead(outputs, min(READ_AHEAD_BYTES, budget // 2))
    # One intra-op thread per tensor: torch's multi-threaded reductions split work by thread count, so a
    # fixed count keeps every tensor's bits independent of `workers`; the cores are used by running
    # several tensors at once instead (measured faster on 2 cores too; see the README's performance notes).
    intra_op_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Everything alive now (torch's modules, the plan) lives until the end: frozen, the collector's full passes
    # skip it (they took 3-12% of the CPU time of copy-bound merges, traversing torch's objects again and again)
    gc.freeze()
    try:
        if workers == 1:
            for index, output in enumerate(outputs):
                read_ahead.advance(index + 1)
                _produce_and_write(writer, output, allow_nonfinite)
                bar.update(_output_bytes(output))
        else:
            _run_parallel(writer, outputs, budget, workers, read_ahead, bar, allow_nonfinite)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        gc.unfreeze()
        torch.set_num_threads(intra_op_threads)
        bar.close()
    return sum(output.spec.nbytes for output in outputs)


def write_outputs(
    folder: Path,
    build_outputs: Callable[[ModelPool], list[OutputTensor]],
    pool: ModelPool,
    *,
    max_shard_bytes: int,
    executor: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    description: str = "merging",
    max_memory: int | None = None,
    workers: int | None = None,
    allow_nonfinite: bool = False,
) -> int:
    """Write a command's outputs here (`write_tensors`) or, with executor 'ray', as one Ray task per shard.

    `build_outputs` is plain, picklable data that rebuilds the outputs from a model pool in any process.
    """
    outputs = build_outputs(pool)
    if executor != "ray":
        return write_tensors(
            folder,
            outputs,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            description=description,
            max_memory=max_memory,
            workers=workers,
            allow_nonfinite=allow_nonfinite,
        )
    from moemerge.distributed.ray_shards import write_shards_on_ray

    specs = list({output.spec.name: output.spec for output in outputs}.values())  # blocks of one tensor: one spec
    return write_shards_on_ray(
        folder,
        build_outputs,
        specs,
        max_shard_bytes=max_shard_bytes,
        ray_address=ray_address,
        workers=workers,
        max_memory=max_memory,
        allow_nonfinite=allow_nonfinite,
    )


def _run_parallel(
    writer: ShardedWriter,
    outputs: Sequence[OutputTensor],
    budget: int,
    workers: int,
    read_ahead: _ReadAhead,
    bar: tqdm,
    allow_nonfinite: bool = False,
) -> None:
    """Start tensors in plan order while their estimated memory fits the budget; a lone tensor always fits."""
    in_flight: dict[Future, int] = {}  # future -> its estimated working bytes
    outputs_of: dict[Future, OutputTensor] = {}
    used = 0

    def collect(block: bool) -> None:
        nonlocal used
        done, _ = wait(in_flight, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            used -= in_flight.pop(future)
            output = outputs_of.pop(future)
            future.result()  # re-raises the first error; the pool's shutdown cancels what has not started
            bar.update(_output_bytes(output))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moemerge") as pool:
        try:
            for index, output in enumerate(outputs):
                cost = working_bytes(output)
                while in_flight and (len(in_flight) >= workers or used + cost > budget):
                    collect(block=True)
                read_ahead.advance(index + 1)
                future = pool.submit(_produce_and_write, writer, output, allow_nonfinite)
                in_flight[future], outputs_of[future] = cost, output
                used += cost
            while in_flight:
                collect(block=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
