"""What a run wrote, read back from the output folder: the end-of-run line and the API's return value."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from moemerge.sizes import format_bytes

# safetensors dtype codes → the names recipes and configs use
Stage = Callable[[str], AbstractContextManager]  # times one named stage of a run (the API's stopwatch)


def no_stage(_name: str) -> AbstractContextManager:
    """A stage that is not timed."""
    return nullcontext()


DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


@dataclass(frozen=True)
class WriteSummary:
    """One finished run: where, how many model folders and shards, bytes, tensors by dtype, and how long."""

    path: Path
    folders: int
    shards: int
    bytes: int
    tensors: int
    dtypes: dict[str, int]  # dtype name → tensor count
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds (plan, gates, calibration, write)

    @property
    def dtype(self) -> str:
        """The dtype most tensors were written in."""
        return max(self.dtypes, key=self.dtypes.__getitem__) if self.dtypes else "none"

    def __str__(self) -> str:
        folders = f" in {self.folders} model folders" if self.folders > 1 else ""
        shards = f"{self.shards} shard{'s' if self.shards != 1 else ''}"
        return (
            f"wrote {self.path}: {self.tensors} tensors ({self.dtype}), {format_bytes(self.bytes)} in {shards}"
            f"{folders}, {self.seconds:.1f} s"
        )


def _header(file: Path) -> dict:
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def summarize(path: Path, seconds: float, timings: dict[str, float] | None = None) -> WriteSummary:
    """Count what is on disk under `path` (each folder with a config.json is one model)."""
    path = Path(path)
    shards = sorted(path.rglob("*.safetensors"))
    dtypes: Counter[str] = Counter()
    for shard in shards:
        for entry in _header(shard).values():
            dtypes[DTYPE_NAMES.get(entry["dtype"], entry["dtype"].lower())] += 1
    return WriteSummary(
        path=path,
        folders=max(1, len(list(path.rglob("config.json")))),
        shards=len(shards),
        bytes=sum(shard.stat().st_size for shard in shards),
        tensors=sum(dtypes.values()),
        dtypes=dict(dtypes),
        seconds=seconds,
        timings=dict(timings or {}),
    )


def format_table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned columns (the dry-run tables of all three commands)."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
