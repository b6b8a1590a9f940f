"""Read one tensor at a time from a checkpoint folder: safetensors shards or weights-only PyTorch `.bin`.

Nothing is loaded up front: the loader keeps only the name → file map, and safetensors files are
memory-mapped, so memory grows with the tensors in flight, not with the model.
"""

from __future__ import annotations

import json
import pickle
import threading
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from moemerge.errors import ModelNotFoundError, TensorError
from moemerge.io.model_ref import resolve_model

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


def load_config(folder: Path, label: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"model {label!r}: no config.json in {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelNotFoundError(f"model {label!r}: config.json is not valid JSON ({error})") from None


class LazyModel:
    """A checkpoint folder whose tensors are read on demand."""

    def __init__(self, folder: Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        self._lock = threading.Lock()
        self._safetensors: dict[Path, object] = {}
        self._bin_shards: dict[Path, dict[str, torch.Tensor]] = {}
        self.file_of = self._map_files()

    @classmethod
    def open(cls, reference: str) -> LazyModel:
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
                weight_map = json.loads(index_path.read_text()).get("weight_map", {})
                return {name: self.folder / file for name, file in weight_map.items()}
        files = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("*.bin"))
        files = [f for f in files if f.name != "training_args.bin"]
        if not files:
            raise ModelNotFoundError(f"model {self.label!r}: no .safetensors or .bin weights in {self.folder}")
        mapping: dict[str, Path] = {}
        for file in files:
            names = self._open_safetensors(file).keys() if file.suffix == ".safetensors" else self._bin(file)
            for name in names:
                mapping[name] = file
        return mapping

    def _open_safetensors(self, file: Path):
        handle = self._safetensors.get(file)
        if handle is None:
            if not file.is_file():
                raise TensorError(f"model {self.label!r}: shard {file.name} listed in the index is missing")
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as error:  # safetensors raises its own error types for corrupt headers
                raise TensorError(f"model {self.label!r}: cannot read {file.name}: {error}") from None
            self._safetensors[file] = handle
        return handle

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        """A `.bin` shard loaded weights-only (no arbitrary pickled code runs), memory-mapped when possible."""
        shard = self._bin_shards.get(file)
        if shard is not None:
            return shard
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
        self._bin_shards[file] = shard
        return shard

    def _require(self, name: str) -> Path:
        file = self.file_of.get(name)
        if file is None:
            raise TensorError(f"model {self.label!r} has no tensor {name!r}")
        return file

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._require(name)
        with self._lock:
            if file.suffix == ".safetensors":
                return tuple(self._open_safetensors(file).get_slice(name).get_shape())
            return tuple(self._bin(file)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        file = self._require(name)
        with self._lock:
            if file.suffix == ".safetensors":
                return SAFETENSORS_DTYPES[self._open_safetensors(file).get_slice(name).get_dtype()]
            return self._bin(file)[name].dtype

    def nbytes(self, name: str) -> int:
        shape = self.shape(name)
        return torch.Size(shape).numel() * self.dtype(name).itemsize

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, cast to `dtype` and moved to `device`."""
        file = self._require(name)
        with self._lock:
            if file.suffix == ".safetensors":
                tensor = self._open_safetensors(file).get_tensor(name)
            else:
                tensor = self._bin(file)[name].clone()
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device) if str(device) != "cpu" else tensor


class ModelPool:
    """Opens each referenced model once and hands out the same LazyModel afterwards."""

    def __init__(self) -> None:
        self._models: dict[str, LazyModel] = {}

    def get(self, reference: str) -> LazyModel:
        model = self._models.get(reference)
        if model is None:
            model = self._models[reference] = LazyModel.open(reference)
        return model
