"""Read one tensor at a time from a checkpoint folder: safetensors shards or weights-only PyTorch `.bin`.

Nothing is loaded up front: the loader keeps only the name → file map, and safetensors files are
memory-mapped, so memory grows with the tensors in flight, not with the model.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

import torch

from moemerge.errors import ModelNotFoundError, TensorError
from moemerge.finite import nonfinite_count
from moemerge.io.model_ref import resolve_model
from moemerge.io.output_dir import protect_model

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header


def load_config(folder: Path, label: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"model {label!r}: no config.json in {folder}")
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelNotFoundError(f"model {label!r}: config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"model {label!r}: config.json is not a JSON object")
    return config


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file (absolute offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class StoredRange:
    """A tensor's bytes (or a block of its rows') in an open safetensors file whose header was checked: what a
    kernel-side copy needs. `shape` is the range's own (the block's rows)."""

    fd: int
    start: int
    length: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"tensor {duplicate!r} is listed twice")
    return mapping


def parse_safetensors_header(raw: bytes, data_length: int) -> dict[str, StoredTensor]:
    """The tensors of a safetensors JSON header, checked by the format's rules; raises ValueError naming the fault.

    Rules (as the safetensors library applies them): a JSON object with unique names; each entry a known dtype,
    a shape of non-negative integers, and [begin, end] offsets whose length is the shape's byte size; sorted by
    offset, the tensors tile the data section exactly: no gaps, no overlaps, nothing outside it.
    """
    header = json.loads(raw, object_pairs_hook=_unique_keys)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not a JSON object")
    entries: list[tuple[int, int, str, torch.dtype, tuple[int, ...]]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise ValueError(f"the entry for {name!r} is not a JSON object")
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise ValueError(f"{name!r} has an unknown dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"{name!r} has shape {shape!r}: not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int and n >= 0 for n in offsets)):
            raise ValueError(f"{name!r} has data_offsets {offsets!r}: not two non-negative integers")
        nbytes = dtype.itemsize
        for size in shape:
            nbytes *= size  # Python integers: a huge shape cannot wrap around, it just fails the checks below
        begin, end = offsets
        if end < begin or end - begin != nbytes:
            raise ValueError(f"{name!r} has offsets [{begin}, {end}] that do not match its shape {shape}")
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort(key=lambda item: (item[0], item[1]))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            fault = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise ValueError(f"{name!r} at byte {begin} {fault} (expected byte {position})")
        position = end
    if position != data_length:
        raise ValueError(f"the tensors cover {position} bytes but the data section holds {data_length}")
    data_start = 8 + len(raw)
    return {
        name: StoredTensor(dtype, shape, data_start + begin, data_start + end)
        for begin, end, name, dtype, shape in entries
    }


def read_header_from_fd(fd: int, file_name: str, label: str) -> dict[str, StoredTensor]:
    """The checked header of the open safetensors file `fd` (read with pread, so the fd can be shared)."""
    size = os.fstat(fd).st_size
    try:
        if size < 8:
            raise ValueError("the file is shorter than the 8-byte header length")
        header_length = int.from_bytes(os.pread(fd, 8, 0), "little")
        if header_length > MAX_HEADER_BYTES:
            raise ValueError(f"header length {header_length} is over the format's {MAX_HEADER_BYTES}-byte limit")
        if header_length > size - 8:
            raise ValueError("header length runs past the end of the file")
        raw = os.pread(fd, header_length, 8)
        if len(raw) != header_length:
            raise ValueError("the file ends inside its header")
        return parse_safetensors_header(raw, size - 8 - header_length)
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        reason = "the header nests too deeply" if isinstance(error, RecursionError) else str(error)
        raise TensorError(f"model {label!r}: {file_name} is not a valid safetensors file: {reason}") from None


def read_safetensors_header(file: Path, label: str) -> dict[str, StoredTensor]:
    """Parse and check a safetensors header into absolute byte ranges."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        raise TensorError(f"model {label!r}: shard {file.name} listed in the index is missing") from None
    except OSError as error:
        raise TensorError(f"model {label!r}: cannot read {file.name}: {error.strerror or error}") from None
    try:
        return read_header_from_fd(fd, file.name, label)
    finally:
        os.close(fd)


class LazyModel:
    """A checkpoint folder whose tensors are read on demand.

    Safetensors tensors are read with `os.preadv` into fresh buffers rather than memory-mapped: reads run
    in parallel from any thread without a lock, and a tensor's memory is returned as soon as it is dropped
    (mapped pages would stay counted in the process's resident memory until the file is closed).
    """

    def __init__(self, folder: Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        self._lock = threading.Lock()  # guards opening files, never reading them
        self._headers: dict[Path, dict[str, StoredTensor]] = {}
        self._fds: dict[Path, int] = {}
        self._identity: dict[Path, tuple[int, int]] = {}  # (size, mtime) of each shard when its header was read
        self._bin_shards: dict[Path, dict[str, torch.Tensor]] = {}
        protect_model(self)  # --overwrite may not replace a folder that holds this model
        self._nonfinite: set[str] = set()  # tensors already reported as holding NaN/Inf
        self.file_of = self._map_files()

    @classmethod
    def open(cls, reference: str) -> LazyModel:
        """A model reference, or mergekit's `base+lora_adapter`: the base read through the adapter."""
        if "+" in reference:
            from moemerge.lora.adapter import AdaptedModel, split_lora_reference  # builds on this loader

            model_reference, adapter_reference = split_lora_reference(reference)
            return AdaptedModel(resolve_model(model_reference), reference, adapter_reference)
        return cls(resolve_model(reference), label=reference)

    @cached_property
    def config(self) -> dict:
        return load_config(self.folder, self.label)

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def has(self, name: str) -> bool:
        return name in self.file_of

    def _map_files(self) -> dict[str, Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.folder / index_name
            if index_path.is_file():
                mapping = self._read_index(index_path)
                for file in dict.fromkeys(mapping.values()):
                    if file.suffix == ".safetensors":
                        self._header(file)  # every shard opened now, at plan time: later reads use these fds
                return mapping
        files = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("*.bin"))
        files = [f for f in files if f.name != "training_args.bin"]
        if not files:
            raise ModelNotFoundError(f"model {self.label!r}: no .safetensors or .bin weights in {self.folder}")
        mapping: dict[str, Path] = {}
        for file in files:
            names = self._header(file) if file.suffix == ".safetensors" else self._bin(file)
            for name in names:
                mapping[name] = file
        return mapping

    def _read_index(self, index_path: Path) -> dict[str, Path]:
        """The index's tensor → shard map; every shard must lie inside the model folder (no absolute path, no `..`).

        The check is on the names as written, not on resolved paths, so the Hugging Face cache's symlinks into
        its blob store still work.
        """
        where = f"model {self.label!r}: {index_path.name}"
        try:
            index = json.loads(index_path.read_bytes())
        except (OSError, ValueError) as error:
            raise TensorError(f"{where} is not valid JSON ({error})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise TensorError(f"{where} has no 'weight_map' object")
        mapping: dict[str, Path] = {}
        for name, file in weight_map.items():
            relative = PurePosixPath(file) if isinstance(file, str) else None
            if relative is None or not file or relative.is_absolute() or ".." in relative.parts or "\\" in file:
                raise TensorError(f"{where} puts {name!r} in {file!r}, outside the model folder")
            mapping[name] = self.folder / relative
        return mapping

    def _open_safetensors(self, file: Path) -> None:
        """Open a shard once, read its header through that descriptor, and remember the file's size and mtime.

        Every later read goes through the same descriptor, so a shard replaced on disk during the run (a new
        file renamed over it) is never mixed in; one rewritten in place is reported (see `_check_unchanged`).
        """
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise TensorError(f"model {self.label!r}: shard {file.name} listed in the index is missing") from None
        except OSError as error:
            raise TensorError(f"model {self.label!r}: cannot open {file.name}: {error.strerror or error}") from None
        try:
            header = read_header_from_fd(fd, file.name, self.label)
            status = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fds[file] = fd
        self._identity[file] = (status.st_size, status.st_mtime_ns)
        self._headers[file] = header

    def _header(self, file: Path) -> dict[str, StoredTensor]:
        header = self._headers.get(file)
        if header is None:
            with self._lock:
                if file not in self._headers:
                    self._open_safetensors(file)
                header = self._headers[file]
        return header

    def _stored(self, name: str, file: Path) -> StoredTensor:
        stored = self._header(file).get(name)
        if stored is None:
            raise TensorError(f"model {self.label!r}: the index puts {name!r} in {file.name}, which does not hold it")
        return stored

    def _fd(self, file: Path) -> int:
        self._header(file)
        fd = self._fds.get(file)
        if fd is None:
            raise TensorError(f"model {self.label!r}: {file.name} was closed")
        return fd

    def _check_unchanged(self, file: Path, fd: int) -> None:
        """A shard written to in place since its header was read is an error, never silently mixed data."""
        status = os.fstat(fd)
        if (status.st_size, status.st_mtime_ns) != self._identity[file]:
            raise TensorError(
                f"model {self.label!r}: {file.name} changed on disk while moemerge was reading it; "
                "rerun once nothing else writes to the input models"
            )

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        """A `.bin` shard loaded weights-only (no arbitrary pickled code runs), memory-mapped when possible."""
        shard = self._bin_shards.get(file)
        if shard is not None:
            return shard
        with self._lock:
            shard = self._bin_shards.get(file)
            if shard is None:
                shard = self._bin_shards[file] = self._load_bin(file)
        return shard

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if not file.is_file():
            raise TensorError(f"model {self.label!r}: shard {file.name} listed in the index is missing")
        try:
            try:
                shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                shard = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError:
            raise TensorError(
                f"model {self.label!r}: refusing {file.name}: it holds pickled objects other than tensors "
                "(moemerge loads .bin files weights-only and never runs code from a checkpoint)"
            ) from None
        except (RuntimeError, EOFError, OSError) as error:
            raise TensorError(f"model {self.label!r}: cannot read {file.name}: {error}") from None
        if not isinstance(shard, dict) or not all(isinstance(v, torch.Tensor) for v in shard.values()):
            raise TensorError(f"model {self.label!r}: {file.name} is not a plain state dict of tensors")
        return shard

    def _require(self, name: str) -> Path:
        file = self.file_of.get(name)
        if file is None:
            raise TensorError(f"model {self.label!r} has no tensor {name!r}")
        return file

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._require(name)
        if file.suffix == ".safetensors":
            return self._stored(name, file).shape
        return tuple(self._bin(file)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        file = self._require(name)
        if file.suffix == ".safetensors":
            return self._stored(name, file).dtype
        return self._bin(file)[name].dtype

    def nbytes(self, name: str) -> int:
        shape = self.shape(name)
        return torch.Size(shape).numel() * self.dtype(name).itemsize

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now (page cache, not this process's memory)."""
        file = self._require(name)
        if file.suffix == ".safetensors" and hasattr(os, "posix_fadvise"):
            stored = self._stored(name, file)
            os.posix_fadvise(self._fd(file), stored.start, stored.end - stored.start, os.POSIX_FADV_WILLNEED)

    def _read_range(self, file: Path, start: int, length: int) -> torch.Tensor:
        """`length` bytes at `start` into a fresh uint8 tensor; preadv releases the GIL, so threads read in parallel."""
        buffer = torch.empty(length, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        fd = self._fd(file)
        done = 0
        while done < length:
            count = os.preadv(fd, [view[done:]], start + done)
            if count == 0:
                break
            done += count
        self._check_unchanged(file, fd)  # after the read: a change before or during it is caught
        if done < length:
            raise TensorError(f"model {self.label!r}: {file.name} ends before its tensors do (truncated download?)")
        return buffer

    def stored_range(self, name: str, rows: tuple[int, int] | None = None) -> StoredRange | None:
        """Where a safetensors tensor (or its rows [start, stop)) lies, from the header checked at open time;
        None when the bytes are not a plain file range (a `.bin` shard, a tensor a LoRA adapter changes)."""
        file = self._require(name)
        if file.suffix != ".safetensors":
            return None
        stored = self._stored(name, file)
        start, length, shape = self._stored_bytes(name, stored, rows=rows)
        return StoredRange(self._fd(file), start, length, stored.dtype, shape)

    def check_unchanged(self, name: str) -> None:
        """Raise if the shard holding `name` was written to in place since its header was read (see `read`)."""
        file = self._require(name)
        self._check_unchanged(file, self._fd(file))

    def _stored_bytes(
        self, name: str, stored: StoredTensor, first_row: int | None = None, rows: tuple[int, int] | None = None
    ) -> tuple[int, int, tuple[int, ...]]:
        """(start, length, shape) of a tensor, of its row `first_row` (shape without that dimension), or of `rows`."""
        shape, start, length = stored.shape, stored.start, stored.end - stored.start
        if first_row is not None:
            if not shape or not 0 <= first_row < shape[0]:
                raise TensorError(f"model {self.label!r}: {name!r} has no index {first_row} (shape {list(shape)})")
            shape = shape[1:]
            length = torch.Size(shape).numel() * stored.dtype.itemsize
            start += first_row * length
        elif rows is not None:
            row_start, row_stop = rows
            if not shape or not 0 <= row_start < row_stop <= shape[0]:
                raise TensorError(
                    f"model {self.label!r}: {name!r} has no rows {row_start}:{row_stop} (shape {list(shape)})"
                )
            row_bytes = torch.Size(shape[1:]).numel() * stored.dtype.itemsize
            shape = (row_stop - row_start, *shape[1:])
            start += row_start * row_bytes
            length = (row_stop - row_start) * row_bytes
        return start, length, shape

    def _read_stored(
        self, name: str, file: Path, first_row: int | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The stored bytes of a tensor, of its row `first_row` (shape without that dimension), or of `rows`."""
        stored = self._stored(name, file)
        start, length, shape = self._stored_bytes(name, stored, first_row, rows)
        return self._read_range(file, start, length).view(stored.dtype).reshape(shape)

    def read(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """One tensor, cast to `dtype` and moved to `device` (the cast runs on the device: less to copy, faster).

        `rows=(start, stop)` reads only `tensor[start:stop]`: a block of a large tensor, merged on its own.
        """
        file = self._require(name)
        if file.suffix == ".safetensors":
            tensor = self._read_stored(name, file, rows=rows)
        else:
            stored = self._bin(file)[name]
            tensor = (stored if rows is None else stored[rows[0] : rows[1]]).clone()
        self._warn_if_nonfinite(name, tensor)
        if str(device) != "cpu":
            tensor = tensor.to(device)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def read_slice(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`tensor[index]` without reading the rest: one expert out of a fused [experts, ...] tensor."""
        file = self._require(name)
        if file.suffix == ".safetensors":
            tensor = self._read_stored(name, file, first_row=index)
        else:
            tensor = self._bin(file)[name][index].clone()
        self._warn_if_nonfinite(name, tensor)
        return tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor

    def _warn_if_nonfinite(self, name: str, tensor: torch.Tensor) -> None:
        """An input with NaN or Inf is reported once, by name: the merge may carry them into the output."""
        count = nonfinite_count(tensor)
        if count and name not in self._nonfinite:
            self._nonfinite.add(name)
            log.warning("model %r: input tensor %r holds %d NaN or Inf values", self.label, name, count)

    def close(self) -> None:
        """Close the open shard files (they are also closed when the process ends)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._headers.clear()  # reopened (and re-checked) if the model is read again


class ModelPool:
    """Opens each referenced model once and hands out the same LazyModel afterwards."""

    def __init__(self) -> None:
        self._models: dict[str, LazyModel] = {}

    def get(self, reference: str) -> LazyModel:
        model = self._models.get(reference)
        if model is None:
            model = self._models[reference] = LazyModel.open(reference)
        return model
