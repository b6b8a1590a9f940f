"""Write a planned dense merge's output shards as Ray tasks: one task per shard, on any node of a cluster.

The driver plans, lays out the shards exactly as the local writer would (`assign_shards` in tensor order),
and sends each task plain data: an output builder (the dense plan and run options, or the MoE recipe and its
router tensors) from which any process rebuilds the output tensors, and the names of the tensors in its
shard. A task opens the models itself (same paths on every node: shared storage or the Hugging Face cache),
merges its tensors with the local executor into a private folder, and renames the finished shard into the
staged output folder under its final name. A shard file appears there only once it is complete and
fsynced, so a worker that dies mid-shard leaves nothing that looks finished, and Ray's retry rewrites it
from the start. The driver then writes the index and the rest of the folder, which the caller renames
into place. Shard headers and tensor bytes do not depend on who wrote them: the output is byte-identical
to a local run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moemerge.errors import MoemergeError, install_hint
from moemerge.io.writer import INDEX_NAME, TensorSpec, assign_shards

if TYPE_CHECKING:
    from moemerge.executor import OutputTensor
    from moemerge.io.loader import ModelPool

log = logging.getLogger(__name__)

SHARD_RETRIES = 2  # Ray re-runs a task whose worker died this many times before the merge fails


@dataclass(frozen=True)
class ShardTask:
    """What one Ray task writes: shard `number` of `count`, holding these tensors in this order."""

    number: int
    count: int
    tensor_names: tuple[str, ...]
    nbytes: int

    @property
    def file_name(self) -> str:
        return f"model-{self.number:05d}-of-{self.count:05d}.safetensors"


def shard_tasks(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[ShardTask]:
    """The local writer's shard layout, as one task per shard."""
    shards = assign_shards(specs, max_shard_bytes)
    return [
        ShardTask(number, len(shards), tuple(spec.name for spec in shard), sum(spec.nbytes for spec in shard))
        for number, shard in enumerate(shards, start=1)
    ]


def write_index(folder: Path, tasks: Sequence[ShardTask]) -> None:
    """The `model.safetensors.index.json` the local writer would write for these shards."""
    weight_map = {name: task.file_name for task in tasks for name in task.tensor_names}
    index = {
        "metadata": {"total_size": sum(task.nbytes for task in tasks)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# builds a command's output tensors in any process from plain data (a picklable callable object, not a closure)
OutputBuilder = Callable[["ModelPool"], list["OutputTensor"]]


def write_one_shard(
    build_outputs: OutputBuilder, task: ShardTask, staging: str, max_memory: int | None, allow_nonfinite: bool
) -> dict:
    """Compute the tensors of one shard and move the finished shard file into `staging` (runs in a Ray worker)."""
    from moemerge.executor import write_tensors
    from moemerge.io.loader import ModelPool

    started = time.monotonic()
    wanted = set(task.tensor_names)
    outputs = [output for output in build_outputs(ModelPool()) if output.spec.name in wanted]
    # the worker's own scratch folder beside the output (same file system: the final rename is atomic)
    scratch = Path(tempfile.mkdtemp(prefix=f".shard-{task.number:05d}-", dir=staging))
    try:
        write_tensors(
            scratch,
            outputs,
            max_shard_bytes=task.nbytes + 1,
            progress=False,
            max_memory=max_memory,
            workers=1,  # one thread per tensor, as locally; Ray spreads the shards over the cores
            allow_nonfinite=allow_nonfinite,
        )
        written = scratch / "model-00001-of-00001.safetensors"
        _test_death(task)
        os.rename(written, Path(staging) / task.file_name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"shard": task.number, "bytes": task.nbytes, "seconds": time.monotonic() - started, "node": os.uname()[1]}


def _test_death(task: ShardTask) -> None:
    """Test hook: `MOEMERGE_TEST_DIE_IN_SHARD=N:MARKER` kills the worker once, before shard N is moved in."""
    spec = os.environ.get("MOEMERGE_TEST_DIE_IN_SHARD")
    if spec:
        number, marker = spec.split(":", 1)
        if int(number) == task.number and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)


def start_ray(address: str | None, num_cpus: int | None = None):
    """Join the cluster at `address`, or start a local Ray in this process with the machine's cores."""
    try:
        import ray
    except ImportError:
        raise MoemergeError(f"--executor ray needs Ray: {install_hint('ray', 'ray')}") from None
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
    return ray


def write_shards_on_ray(
    folder: Path,
    build_outputs: OutputBuilder,
    specs: Sequence[TensorSpec],
    *,
    max_shard_bytes: int,
    ray_address: str | None = None,
    workers: int | None = None,
    max_memory: int | None = None,
    allow_nonfinite: bool = False,
) -> int:
    """Write every planned shard into `folder` as Ray tasks, then the index; returns bytes written."""
    ray = start_ray(ray_address, workers)
    tasks = shard_tasks(specs, max_shard_bytes)
    remote = ray.remote(num_cpus=1, max_retries=SHARD_RETRIES)(write_one_shard)
    builder = ray.put(build_outputs)
    pending = {remote.remote(builder, task, str(folder), max_memory, allow_nonfinite): task for task in tasks}
    done_bytes = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                task = pending.pop(ref)
                report = ray.get(ref)
                done_bytes += task.nbytes
                log.info(
                    "shard %d/%d written on %s in %.1f s", task.number, task.count, report["node"], report["seconds"]
                )
    except ray.exceptions.RayTaskError as error:
        for ref in pending:
            ray.cancel(ref, force=True)
        cause = getattr(error, "cause", None)
        if isinstance(cause, MoemergeError):  # a user's mistake found in a worker: still one line
            raise type(cause)(*cause.args) from None
        raise
    for scratch in Path(folder).glob(".shard-*"):  # left by workers that died before their cleanup
        shutil.rmtree(scratch, ignore_errors=True)
    write_index(folder, tasks)
    return done_bytes
