"""Compute planned output tensors and stream them into the sharded writer.

Every command (dense merge, MoE assembly, expert extraction) ends the same way: a list of output
tensors whose names, shapes and dtypes are known, each with a function that produces it. This
module is the one place that runs those functions and writes the results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moemerge.io.writer import ShardedWriter, TensorSpec


@dataclass(frozen=True)
class OutputTensor:
    spec: TensorSpec
    produce: Callable[[], torch.Tensor]


def write_tensors(
    folder: Path,
    outputs: Sequence[OutputTensor],
    *,
    max_shard_bytes: int,
    progress: bool = True,
    description: str = "merging",
) -> int:
    """Produce every output tensor in order and write it; returns the bytes written."""
    writer = ShardedWriter(folder, [output.spec for output in outputs], max_shard_bytes)
    try:
        for output in tqdm(outputs, desc=description, unit="tensor", disable=not progress):
            tensor = output.produce()
            writer.write(output.spec.name, tensor.to(output.spec.dtype))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return sum(output.spec.nbytes for output in outputs)
