"""Read one expert's gate/up/down projections per layer from an MoE checkpoint, in either layout.

On disk (what transformers v5's save_pretrained writes for most families) every expert has its own
three tensors, named by the architecture table. In memory, v5 fuses them per layer: `experts.gate_up_proj`
[E, 2I, H] (gate rows first, then up rows: the model computes `gate, up = (x @ W.T).chunk(2)`) and
`experts.down_proj` [E, H, I]; Mixtral's block is also renamed `block_sparse_moe` → `mlp` there.
A checkpoint written straight from `state_dict()` has that fused layout, so both are read here.
GPT-OSS is only ever stored fused, transposed and interleaved (gate_up [E, H, 2I], gate at even
columns; down [E, I, H]) with per-expert biases; the table's `FusedExperts.orientation` says which.
Whatever the layout, `expert_part` returns gate/up as [I, H] and down as [H, I].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from moemerge.architectures import (
    Architecture,
    FusedExperts,
    MoeLayout,
    Role,
    expert_count_keys,
    layer_count,
    layer_of,
    require_architecture,
)
from moemerge.errors import MoemergeError, TensorError
from moemerge.io.loader import LazyModel

Part = Literal["gate", "up", "down"]
EXPERT_COUNT_KEYS = expert_count_keys()  # transformers aliases one to the other per model


@dataclass(frozen=True)
class FusedNames:
    """Names of one layer's fused expert tensors and router, and the table's layout they follow."""

    gate_up: str
    down: str
    router: str
    layout: FusedExperts
    extra: tuple[str, ...] = ()  # per-expert biases present in the checkpoint

    def names(self) -> tuple[str, ...]:
        return (self.gate_up, self.down, *self.extra)


class MoeSource:
    """An MoE checkpoint seen as layers of routers and experts, whichever layout it is stored in."""

    def __init__(self, model: LazyModel):
        self.model = model
        self.config = model.config
        self.arch: Architecture = require_architecture(self.config, model_label=model.label, need="expert extraction")
        if self.arch.moe is None:
            raise MoemergeError(
                f"model {model.label!r} is a dense {self.config.get('model_type')!r} model, not a mixture of experts"
            )
        self.moe: MoeLayout = self.arch.moe
        self.num_layers = layer_count(self.config, self.arch, model.names, label=f"model {model.label!r}")
        self.fused = self._fused_names()
        self.moe_layers = [layer for layer in range(self.num_layers) if self._router_name(layer) is not None]
        if not self.moe_layers:
            raise TensorError(f"model {model.label!r}: no router tensor ({self.moe.router}) in any layer")
        first = self._router_name(self.moe_layers[0])
        if self.fused_only and self.moe_layers[0] not in self.fused:
            quantized = self.arch.layer_name(self.moe_layers[0], self.moe.fused[0].gate_up + "_blocks")
            raise MoemergeError(
                f"model {model.label!r}: "
                + (
                    "its experts are MXFP4-quantized (gate_up_proj_blocks/_scales), which moemerge-split does not "
                    "read; dequantize to bfloat16 first (transformers' Mxfp4Config(dequantize=True), save_pretrained)"
                    if model.has(quantized)
                    else f"no fused expert tensors ({self.moe.fused[0].gate_up}) beside router {first}"
                )
            )
        self.num_experts = model.shape(first)[0]
        keys = (self.moe.expert_count_key, *EXPERT_COUNT_KEYS)
        declared = next((int(self.config[k]) for k in keys if k in self.config), self.num_experts)
        if declared != self.num_experts:
            raise TensorError(
                f"model {model.label!r}: config.json declares {declared} experts but router {first} has "
                f"{self.num_experts} rows"
            )
        self.experts_per_token = int(self.config.get(self.moe.experts_per_token_key, 1))
        self.intermediate_size = self.part_shape(self.moe_layers[0], "gate")[0]

    def _fused_names(self) -> dict[int, FusedNames]:
        """Layers whose experts are stored fused, with their tensor names (layouts as the table lists them)."""
        found: dict[int, FusedNames] = {}
        for layer in range(self.num_layers):
            for layout in self.moe.fused:
                gate_up = self.arch.layer_name(layer, layout.gate_up)
                if self.model.has(gate_up) and layer not in found:
                    extra = tuple(
                        name
                        for name in (self.arch.layer_name(layer, suffix) for suffix in layout.extra)
                        if self.model.has(name)
                    )
                    found[layer] = FusedNames(
                        gate_up,
                        self.arch.layer_name(layer, layout.down),
                        self.arch.layer_name(layer, layout.router),
                        layout,
                        extra,
                    )
        return found

    def _router_name(self, layer: int) -> str | None:
        candidates = [self.arch.layer_name(layer, self.moe.router)]
        if layer in self.fused:
            candidates.append(self.fused[layer].router)
        return next((name for name in candidates if self.model.has(name)), None)

    def router_name(self, layer: int) -> str:
        name = self._router_name(layer)
        if name is None:
            raise TensorError(f"model {self.model.label!r}: layer {layer} has no router tensor")
        return name

    def router(self, layer: int) -> torch.Tensor:
        return self.model.read(self.router_name(layer))

    def _template(self, part: Part) -> str:
        template = {"gate": self.moe.expert_gate, "up": self.moe.expert_up, "down": self.moe.expert_down}[part]
        if template is None:
            raise TensorError(f"model {self.model.label!r}: {self.arch.name} experts are only stored fused")
        return template

    def expert_name(self, layer: int, expert: int, part: Part) -> str:
        """The on-disk (per-expert) name of one expert projection, as the table spells it."""
        return self.arch.layer_name(layer, self._template(part).format(expert=expert))

    @property
    def fused_only(self) -> bool:
        """The family has no per-expert layout (GPT-OSS): a pruned model keeps the fused tensors."""
        return self.moe.expert_templates() is None

    def check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise MoemergeError(f"expert {expert} is out of range: the model has experts 0..{self.num_experts - 1}")

    def expert_part(self, layer: int, expert: int, part: Part) -> torch.Tensor:
        """One expert's gate [I, H], up [I, H] or down [H, I] weight, as stored (no cast)."""
        self.check_expert(expert)
        fused = self.fused.get(layer)
        if fused is None:
            return self.model.read(self.expert_name(layer, expert, part))
        if fused.layout.orientation == "in_out_interleaved":  # gate_up [H, 2I] gate at even columns; down [I, H]
            if part == "down":
                return self.model.read_slice(fused.down, expert).T.contiguous()
            gate_up = self.model.read_slice(fused.gate_up, expert)
            return gate_up[:, 0 if part == "gate" else 1 :: 2].T.contiguous()
        if part == "down":
            return self.model.read_slice(fused.down, expert)
        gate, up = self.model.read_slice(fused.gate_up, expert).chunk(2, dim=0)
        return (gate if part == "gate" else up).contiguous()

    def stored_expert_part(self, layer: int, expert: int, part: Part) -> tuple[LazyModel, str] | None:
        """(model, tensor) that `expert_part` returns unchanged: a per-expert layout's own tensor; None when fused."""
        if layer in self.fused:
            return None
        self.check_expert(expert)
        return self.model, self.expert_name(layer, expert, part)

    def part_shape(self, layer: int, part: Part) -> tuple[int, ...]:
        fused = self.fused.get(layer)
        if fused is None:
            return self.model.shape(self.expert_name(layer, 0, part))
        if fused.layout.orientation == "in_out_interleaved":
            if part == "down":
                return tuple(reversed(self.model.shape(fused.down)[1:]))
            experts, hidden, columns = self.model.shape(fused.gate_up)
            return (columns // 2, hidden)
        if part == "down":
            return self.model.shape(fused.down)[1:]
        experts, rows, hidden = self.model.shape(fused.gate_up)
        return (rows // 2, hidden)

    def part_dtype(self, layer: int) -> torch.dtype:
        fused = self.fused.get(layer)
        return self.model.dtype(fused.down if fused else self.expert_name(layer, 0, "down"))

    @property
    def has_shared_expert(self) -> bool:
        shared = self.moe.shared_expert
        return shared is not None and self.model.has(self.arch.layer_name(self.moe_layers[0], shared.gate))

    def shared_name(self, layer: int, part: Part) -> str:
        shared = self.moe.shared_expert
        assert shared is not None
        return self.arch.layer_name(layer, {"gate": shared.gate, "up": shared.up, "down": shared.down}[part])

    def shared_part(self, layer: int, part: Part) -> torch.Tensor:
        return self.model.read(self.shared_name(layer, part))

    def is_expert_tensor(self, name: str) -> bool:
        """Router, routed experts (either layout), shared expert and its gate: everything a split replaces."""
        role = self.arch.role_of(name)
        if role in (Role.ROUTER, Role.EXPERT, Role.SHARED_EXPERT, Role.SHARED_EXPERT_GATE):
            return True
        layer = layer_of(name)
        fused = self.fused.get(layer) if layer is not None else None
        return fused is not None and name in (*fused.names(), fused.router)

    def dense_layers(self) -> list[int]:
        """Layers without experts (e.g. Qwen2-MoE's mlp_only_layers)."""
        return [layer for layer in range(self.num_layers) if layer not in self.moe_layers]
