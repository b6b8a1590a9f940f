"""Write safetensors shards whose layout is known before the first tensor is computed.

Every command knows each output tensor's name, shape and dtype before reading any input, so the
writer lays out all shards up front (headers written, space reserved) and each tensor is written
straight to its offset with `os.pwrite` as soon as it is ready, in any order, from any thread.
Nothing is buffered per shard: a tensor leaves memory as soon as it is on disk. The file format is
the one page in the safetensors README: u64 header size, JSON header, raw little-endian bytes.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.errors import OutputError
from moemerge.io.loader import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
# copy_file_range's answers that hold for every file pair of the run: no such call, different filesystems, a file
# type or filesystem that cannot do it
KERNEL_COPY_UNSUPPORTED = (errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL)


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor's name, shape and dtype, known before it is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def assign_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def _header(specs: Sequence[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """The padded JSON header and each tensor's offset from the start of the data section."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    position = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [position, position + spec.nbytes],
        }
        offsets[spec.name] = position
        position += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    return encoded, offsets


class ShardedWriter:
    """Writes `model-0000i-of-0000N.safetensors` shards and their index into a folder."""

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        self.specs = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError("duplicate output tensor names")
        self._lock = threading.Lock()
        self._pending = set(self.specs)
        self._unwritten = {spec.name: spec.nbytes for spec in specs}  # bytes still to come, per tensor
        self._location: dict[str, tuple[str, int, int]] = {}  # name -> (shard file, fd, absolute offset)
        self._files: list[tuple[str, int]] = []
        self._kernel_copy = hasattr(os, "copy_file_range")  # place_range copies inside the kernel (Linux, Python 3.8+)
        shards = assign_shards(specs, max_shard_bytes)
        try:
            for number, shard in enumerate(shards, start=1):
                file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                self._open_shard(file_name, shard)
        except BaseException:
            self.abort()  # close the shards already opened; the staged folder is deleted by the caller
            raise

    def _open_shard(self, file_name: str, shard: Sequence[TensorSpec]) -> None:
        header, offsets = _header(shard)
        data_start = 8 + len(header)
        total = data_start + sum(spec.nbytes for spec in shard)
        path = self.folder / file_name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # umask applies, as for any file
            self._files.append((file_name, fd))
            self._reserve(fd, total, path)
            os.pwrite(fd, len(header).to_bytes(8, "little") + header, 0)
        except OSError as error:
            raise _output_error(error, path) from None
        for spec in shard:
            self._location[spec.name] = (file_name, fd, data_start + offsets[spec.name])

    @staticmethod
    def _reserve(fd: int, total: int, path: Path) -> None:
        """Claim the shard's disk space now, so a full disk fails before hours of work, not after."""
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                os.ftruncate(fd, total)
            else:
                raise

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write a tensor, or the block of its rows that starts at `first_row`, at its reserved place.

        Safe to call from several threads; a tensor counts as written once all its bytes are.
        """
        spec = self.specs[name]
        rows = tensor.shape[0] if spec.shape and tensor.dim() == len(spec.shape) else None
        whole = tuple(tensor.shape) == spec.shape and first_row == 0
        block = rows is not None and tuple(tensor.shape[1:]) == spec.shape[1:] and first_row + rows <= spec.shape[0]
        if not (whole or block) or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"{name}: computed {tuple(tensor.shape)} {tensor.dtype} at row {first_row}, "
                f"planned {spec.shape} {spec.dtype}"
            )
        _, fd, offset = self._location[name]
        block_bytes = tensor.numel() * spec.dtype.itemsize
        if first_row:
            offset += first_row * (spec.nbytes // spec.shape[0])
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        start = offset
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as error:
            raise _output_error(error, self.folder / name) from None
        _start_writeback(fd, start, offset - start)
        self._count_written(name, block_bytes)

    def place_range(self, name: str, source_fd: int, source_offset: int, length: int, first_row: int = 0) -> bool:
        """Copy `length` bytes of an input file into the tensor's place (or its rows from `first_row`), inside the
        kernel (`os.copy_file_range`): no buffer in this process, no page faults, no copies through user space.

        Returns False, having counted nothing, when the kernel cannot do it here (no such call, another filesystem,
        a source shorter than promised): the caller then writes the tensor itself, over whatever was copied.
        """
        spec = self.specs[name]
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        whole = first_row == 0 and length == spec.nbytes
        block = row_bytes > 0 and length % row_bytes == 0 and first_row + length // row_bytes <= spec.shape[0]
        if not (whole or block):
            raise RuntimeError(f"{name}: {length} bytes at row {first_row} do not fit its planned {spec.shape}")
        if not self._kernel_copy:
            return False
        _, fd, offset = self._location[name]
        offset += first_row * row_bytes
        done = 0
        try:
            while done < length:
                copied = os.copy_file_range(source_fd, fd, length - done, source_offset + done, offset + done)
                if copied == 0:
                    return False  # the source ends early: the caller's own read reports it
                done += copied
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _output_error(error, self.folder / name) from None
            if error.errno in KERNEL_COPY_UNSUPPORTED:
                self._kernel_copy = False  # the same answer for every later tensor: stop asking
            return False  # anything else: the caller's read and write report real errors in their own words
        _start_writeback(fd, offset, length)
        self._count_written(name, length)
        return True

    def _count_written(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._unwritten[name] -= nbytes
            if self._unwritten[name] <= 0:
                self._pending.discard(name)

    def close(self) -> None:
        """Check every planned tensor was written, flush the shards and write the index."""
        if self._pending:
            missing = sorted(self._pending)[:3]
            raise RuntimeError(f"{len(self._pending)} planned tensors were never written, e.g. {missing}")
        try:
            for _, fd in self._files:
                os.fsync(fd)  # a full disk can surface only here, when delayed allocation meets the disk
        except OSError as error:
            raise _output_error(error, self.folder) from None
        for _, fd in self._files:
            os.close(fd)
        self._files = []
        weight_map = {name: file_name for name, (file_name, _, _) in self._location.items()}
        index = {
            "metadata": {"total_size": sum(spec.nbytes for spec in self.specs.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        try:
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        except OSError as error:
            raise _output_error(error, self.folder / INDEX_NAME) from None

    def abort(self) -> None:
        for _, fd in self._files:
            os.close(fd)
        self._files = []


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these bytes to disk now, and drop them from the page cache once written (Linux).

    Without it every dirty page waits for the final fsync, so the disk idles while tensors are merged and
    then the whole output is flushed at the end; FADV_DONTNEED starts asynchronous writeback of the range.
    """
    if hasattr(os, "posix_fadvise") and length:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # only a hint: the fsync in close() is what makes the data durable


def _output_error(error: OSError, path: Path) -> OutputError:
    if error.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}: free space or choose another output folder")
    return OutputError(f"cannot write {path}: {error.strerror or error}")
