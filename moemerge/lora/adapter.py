"""`base+adapter` model references: a PEFT LoRA adapter folded into its base while each tensor streams.

A target tensor is read from the base and gets ΔW = scale · B·A added (scale = α/r, or α/√r with rsLoRA;
transposed for embeddings and `fan_in_fan_out` layers), so memory stays per tensor, as with any other
input. The adapter's own tensors are small and read once. What peft's `merge_and_unload()` would do is
the reference: the tests compare against it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.errors import ModelNotFoundError, MoemergeError, TensorError
from moemerge.io.loader import LazyModel, StoredRange
from moemerge.io.model_ref import resolve_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<linear>lora_[AB])\.(?P<param>weight|bias)|(?P<embedding>lora_embedding_[AB]))$"
)
# Config switches for adapter kinds whose merge is not ΔW = scale·B·A; each is refused by name.
UNSUPPORTED_SWITCHES = {
    "use_dora": "DoRA adapters rescale each column by a learned magnitude",
    "trainable_token_indices": "trainable-token adapters patch single embedding rows",
    "target_parameters": "adapters on bare parameters (fused MoE experts) are not supported",
    "layer_replication": "layer replication changes the model's layer stack",
    "use_qalora": "QALoRA pools the input before A",
}


class AdapterError(MoemergeError):
    """A LoRA adapter that is missing, malformed or of a kind moemerge cannot fold into its base."""


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = scale · B·A for a Linear weight; transposed (scale · (B·A)ᵀ) for embeddings and fan_in_fan_out."""

    lora_a: torch.Tensor  # [r, in] (embeddings: [r, vocab])
    lora_b: torch.Tensor  # [out, r] (embeddings: [dim, r])
    scale: float
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.lora_b.shape[0], self.lora_a.shape[1]
        return (cols, rows) if self.transposed else (rows, cols)

    def apply(self, base: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        start, stop = rows if rows is not None else (0, self.shape[0])
        a = self.lora_a.to(base.device, torch.float32)
        b = self.lora_b.to(base.device, torch.float32)
        # only the requested rows of ΔW are formed: rows of B, or (transposed) columns of A
        delta = a[:, start:stop].T @ b.T if self.transposed else b[start:stop] @ a
        return (base.float() + self.scale * delta).to(base.dtype)


@dataclass(frozen=True)
class BiasDelta:
    """`lora_bias=True`: the bias gets scale · lora_B.bias."""

    bias: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bias.shape)

    def apply(self, base: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        bias = self.bias if rows is None else self.bias[rows[0] : rows[1]]
        return (base.float() + self.scale * bias.to(base.device, torch.float32)).to(base.dtype)


@dataclass(frozen=True)
class Replacement:
    """A `modules_to_save` tensor: the adapter carries the whole trained tensor, which replaces the base's."""

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def apply(self, base: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        tensor = self.tensor if rows is None else self.tensor[rows[0] : rows[1]]
        return tensor.to(base.device, base.dtype)


Change = LowRankDelta | BiasDelta | Replacement


def split_lora_reference(reference: str) -> tuple[str, str | None]:
    """'base+adapter' → ('base', 'adapter'); a plain reference → (reference, None). mergekit's syntax."""
    model, plus, adapter = reference.partition("+")
    if not plus:
        return reference, None
    if not model or not adapter or "+" in adapter:
        raise ModelNotFoundError(f"model {reference!r}: expected 'MODEL+LORA_ADAPTER' with one '+'")
    return model, adapter


def resolve_adapter(reference: str) -> Path:
    """A local PEFT folder, or an `org/name` adapter repo from the Hugging Face cache (or hub)."""
    local = Path(reference).expanduser()
    if local.is_dir():
        folder = local.resolve()
    elif local.exists() or reference.count("/") != 1 or reference.startswith((".", "/", "~")):
        raise AdapterError(f"LoRA adapter {reference!r} not found: no such folder, and not an 'org/name' repo id")
    else:
        try:
            folder = resolve_model(reference)
        except ModelNotFoundError as error:
            raise AdapterError(f"LoRA adapter {reference!r}: {error}") from None
    if not (folder / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"LoRA adapter {reference!r}: no {ADAPTER_CONFIG} in {folder} (not a PEFT adapter folder)")
    return folder


def _read_config(folder: Path, label: str) -> dict:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise AdapterError(f"LoRA adapter {label!r}: cannot read {ADAPTER_CONFIG}: {error}") from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"LoRA adapter {label!r}: peft_type {peft_type!r} is not supported (only LORA)")
    for key, why in UNSUPPORTED_SWITCHES.items():
        if config.get(key):
            raise AdapterError(f"LoRA adapter {label!r}: {key} is set, which moemerge cannot merge ({why})")
    return config


def _read_weights(folder: Path, label: str) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is the user's input, reported in one line
            raise AdapterError(f"LoRA adapter {label!r}: cannot read {name}: {error}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"LoRA adapter {label!r}: {name} is not a plain state dict of tensors")
        return state
    raise AdapterError(f"LoRA adapter {label!r}: no {' or '.join(ADAPTER_WEIGHTS)} in {folder}")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _target_name(base: LazyModel, wanted: str, key: str, label: str) -> str:
    """The base tensor a PEFT key means: the same name, or the one name that matches it up to a leading prefix.

    peft names modules as the wrapped model sees them (`model.layers.0...` inside a CausalLM); checkpoints of
    other wrappers add or drop a prefix (`language_model.`, `transformer.`), which the suffix match absorbs.
    """
    if base.has(wanted):
        return wanted
    matches = [n for n in base.names if n.endswith("." + wanted) or wanted.endswith("." + n)]
    if len(matches) == 1:
        return matches[0]
    found = f"several base tensors match ({', '.join(sorted(matches)[:3])})" if matches else "the base lacks it"
    raise AdapterError(f"LoRA adapter {label!r}: {key!r} targets {wanted!r}, but {found}")


class LoraAdapter:
    """The changes one PEFT LoRA adapter makes to its base, keyed by the base's tensor names."""

    def __init__(self, folder: Path, label: str, base: LazyModel):
        self.folder, self.label = folder, label
        self.config = _read_config(folder, label)
        weights = _read_weights(folder, label)
        self.changes: dict[str, list[Change]] = {}  # per base tensor, applied in order (a replacement first)
        parts_of: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # module -> {"A"|"B"|"bias": (key, tensor)}
        for key, tensor in weights.items():
            inner = key.removeprefix(PEFT_PREFIX)
            if "lora_magnitude_vector" in inner:
                raise AdapterError(f"LoRA adapter {label!r}: {key!r} is a DoRA magnitude, which moemerge cannot merge")
            match = LORA_KEY.match(inner)
            if match is None:
                if ".lora_" in inner:
                    raise AdapterError(f"LoRA adapter {label!r}: unrecognised adapter tensor {key!r}")
                # modules_to_save, or an embedding's base layer saved beside its LoRA (save_embedding_layers)
                inner = inner.replace(".base_layer.", ".")
                self._add(_target_name(base, inner, key, label), Replacement(tensor), key, base)
                continue
            kind = "bias" if match["param"] == "bias" else (match["linear"] or match["embedding"])[-1]
            parts_of.setdefault(match["module"], {})[kind] = (key, tensor)
        for module, parts in parts_of.items():
            self._add_module(base, module, parts)

    def _scale(self, module: str, rank: int, key: str) -> float:
        config = self.config
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        if int(r) != rank:
            raise AdapterError(f"LoRA adapter {self.label!r}: {key!r} has rank {rank} but adapter_config.json says {r}")
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    def _add_module(self, base: LazyModel, module: str, parts: dict[str, tuple[str, torch.Tensor]]) -> None:
        if "A" not in parts or "B" not in parts:
            key = next(iter(parts.values()))[0]
            raise AdapterError(f"LoRA adapter {self.label!r}: {key!r} has no matching lora_{'AB'['A' in parts]}")
        (key, lora_a), (_, lora_b) = parts["A"], parts["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterError(
                f"LoRA adapter {self.label!r}: {key!r} has shapes A {list(lora_a.shape)}, B {list(lora_b.shape)}; "
                "only Linear and Embedding LoRA (2-D A and B of one rank) are supported"
            )
        scale = self._scale(module, lora_a.shape[0], key)
        transposed = "lora_embedding_" in key or bool(self.config.get("fan_in_fan_out"))
        delta = LowRankDelta(lora_a, lora_b, scale, transposed)
        self._add(_target_name(base, f"{module}.weight", key, self.label), delta, key, base)
        if "bias" in parts:  # lora_bias=True: lora_B's bias, scaled like the weight, is added to the layer's bias
            bias_key, bias = parts["bias"]
            target = _target_name(base, f"{module}.bias", bias_key, self.label)
            self._add(target, BiasDelta(bias, scale), bias_key, base)

    def _add(self, target: str, change: Change, key: str, base: LazyModel) -> None:
        earlier = self.changes.setdefault(target, [])
        if any(type(other) is type(change) for other in earlier):
            raise AdapterError(f"LoRA adapter {self.label!r}: {key!r} changes {target!r} a second time")
        shape = base.shape(target)
        if tuple(change.shape) != tuple(shape):
            what = "modules_to_save tensor" if isinstance(change, Replacement) else "update"
            raise AdapterError(
                f"LoRA adapter {self.label!r}: {key!r} is a {what} of shape {list(change.shape)} for {target!r}, "
                f"which has shape {list(shape)} in the base (a resized vocabulary is not supported)"
            )
        earlier.append(change)
        earlier.sort(key=lambda c: not isinstance(c, Replacement))


class AdaptedModel(LazyModel):
    """A base checkpoint read through a LoRA adapter: the tensors the adapter touches come back updated."""

    def __init__(self, folder: Path, label: str, adapter_reference: str):
        super().__init__(folder, label=label)
        self.adapter = LoraAdapter(resolve_adapter(adapter_reference), adapter_reference, self)

    def read(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        changes = self.adapter.changes.get(name)
        if not changes:
            return super().read(name, dtype=dtype, device=device, rows=rows)
        updated = super().read(name, device=device, rows=rows)
        for change in changes:
            updated = change.apply(updated, rows)
        return updated if dtype is None or updated.dtype == dtype else updated.to(dtype)

    def stored_range(self, name: str, rows: tuple[int, int] | None = None) -> StoredRange | None:
        """A tensor the adapter changes is not its stored bytes: never copied as a file range."""
        return None if self.adapter.changes.get(name) else super().stored_range(name, rows)

    def read_slice(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.adapter.changes:
            return super().read_slice(name, index, dtype=dtype)
        if not 0 <= index < self.shape(name)[0]:
            raise TensorError(f"model {self.label!r}: {name!r} has no index {index}")
        return self.read(name, dtype=dtype, rows=(index, index + 1))[0]
