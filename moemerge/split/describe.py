"""The `moemerge-split --dry-run` text: the MoE, then per output a per-layer table (per tensor with -v).

It reads the same way as the dry runs of `moemerge-yaml` and `moemerge-moe` (header lines, a blank line, then
`format_table` columns): which experts each layer keeps or drops, or which experts become its dense MLP, with
sizes from the planned tensors' shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moemerge.architectures import layer_of
from moemerge.io.summary import format_table
from moemerge.sizes import format_bytes
from moemerge.split.experts import MoeSource
from moemerge.split.usage import RouterUsage

if TYPE_CHECKING:
    import torch

    from moemerge.split.run import SplitOutput


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def experts_text(experts: Sequence[int]) -> str:
    """`1, 3` (an empty list as `-`)."""
    return ", ".join(str(expert) for expert in experts) or "-"


def _size(output: SplitOutput) -> int:
    return sum(tensor.spec.nbytes for tensor in output.tensors)


def _dtypes(output: SplitOutput) -> str:
    return ", ".join(sorted({_dtype_name(tensor.spec.dtype) for tensor in output.tensors}))


def _routed_share(usage: RouterUsage | None, layer: int, experts: Sequence[int]) -> str:
    """Share of the layer's top-k routing decisions on the calibration text that went to `experts`."""
    if usage is None:
        return ""
    picks = float(usage.counts[layer].sum())
    return f"{float(usage.counts[layer, list(experts)].sum()) / picks:.0%}" if picks else "-"


def _dense_from(described: dict, source: MoeSource) -> str:
    experts = described["experts"]
    shared = " + shared expert" if source.has_shared_expert else ""
    if described.get("combine"):
        return f"mean of experts {experts_text(experts)}{shared}"
    return f"expert{'s' if len(experts) > 1 else ''} {experts_text(experts)}{shared}"


def _layer_cells(output: SplitOutput, source: MoeSource, usage: RouterUsage | None, layer: int | None) -> list[str]:
    """What one layer of the output takes from the MoE (the columns after layer/tensors/size)."""
    described = output.layers.get(layer) if layer is not None else None
    if output.mode == "prune":
        if described is None:
            note = "dense MLP, copied" if layer is not None and layer in source.dense_layers() else ""
            return [note, "", *([""] if usage else [])]
        kept = described["kept_experts"]
        dropped = [expert for expert in range(source.num_experts) if expert not in kept]
        return [experts_text(kept), experts_text(dropped), *([_routed_share(usage, layer, kept)] if usage else [])]
    cells = ["" if described is None else _dense_from(described, source)]
    if _has_scales(output):
        cells.append("" if described is None else ", ".join(f"{scale:.4g}" for scale in described.get("scales", [])))
    if source.has_shared_expert:
        cells.append("" if described is None else f"{described.get('shared_expert_scale', 1.0):.4g}")
    if usage is not None:
        cells.append("" if described is None else _routed_share(usage, layer, described["experts"]))
    return cells


def _has_scales(output: SplitOutput) -> bool:
    """Whether any layer scales its experts (not the case for one expert, or the weight average)."""
    return any(scale != 1.0 for described in output.layers.values() for scale in described.get("scales", []))


def _header(output: SplitOutput, source: MoeSource, usage: RouterUsage | None, per_tensor: bool) -> list[str]:
    first = ["tensor" if per_tensor else "layer"]
    if per_tensor:
        first += ["shape", "dtype"]
    else:
        first += ["tensors"]
    first += ["size"]
    if output.mode == "prune":
        first += ["kept experts", "dropped experts"]
    else:
        first += ["dense MLP from"]
        if _has_scales(output):
            first += ["scales (mean routing weight)"]
        if source.has_shared_expert:
            first += ["shared expert scale"]
    if usage is not None:
        first += ["share of top-k picks"]
    return first


def _tensor_origins(output: SplitOutput, source: MoeSource) -> dict[str, str]:
    """Pruned outputs: each kept expert's new tensor name → `expert OLD` (the experts are renumbered 0..K-1).

    A fused-only family (GPT-OSS) keeps its fused tensors, sliced: they read `slice of experts ...`.
    """
    if output.mode != "prune" or source.fused_only:
        return {}
    origins = {}
    for layer, described in output.layers.items():
        for new_index, old_index in enumerate(described["kept_experts"]):
            for part in ("gate", "up", "down"):
                origins[source.expert_name(layer, new_index, part)] = f"expert {old_index}"
    return origins


def layer_table(
    output: SplitOutput, source: MoeSource, usage: RouterUsage | None = None, *, per_tensor: bool = False
) -> list[str]:
    """One row per layer (`-` for the tensors outside the layers) or per tensor, and a total row."""
    rows = [_header(output, source, usage, per_tensor)]
    width = len(rows[0])
    if per_tensor:
        origins = _tensor_origins(output, source)
        for tensor in output.tensors:
            spec = tensor.spec
            layer = layer_of(spec.name)
            cells = _layer_cells(output, source, usage, layer)
            if spec.name in origins:
                cells = [origins[spec.name], *[""] * (len(cells) - 1)]
            elif source.model.has(spec.name):
                same = tuple(source.model.shape(spec.name)) == tuple(spec.shape)
                routed = output.layers.get(layer, {}).get("kept_experts", [])
                cells = ["copied" if same else f"slice of experts {experts_text(routed)}", *[""] * (len(cells) - 1)]
            shape = "×".join(str(size) for size in spec.shape)
            rows.append([spec.name, shape, _dtype_name(spec.dtype), format_bytes(spec.nbytes), *cells])
    else:
        groups: dict[int | None, list] = {}
        for tensor in output.tensors:
            groups.setdefault(layer_of(tensor.spec.name), []).append(tensor)
        for layer, tensors in groups.items():
            size = sum(tensor.spec.nbytes for tensor in tensors)
            cells = _layer_cells(output, source, usage, layer)
            rows.append(["-" if layer is None else str(layer), str(len(tensors)), format_bytes(size), *cells])
    total = ["total", str(len(output.tensors)), format_bytes(_size(output))]
    if per_tensor:
        total = ["total", f"{len(output.tensors)} tensors", "", format_bytes(_size(output))]
    rows.append(total + [""] * (width - len(total)))
    return format_table(rows)


def source_line(source: MoeSource) -> str:
    """The MoE being split: architecture, experts, size."""
    model = source.model
    size = sum(model.nbytes(name) for name in model.names)
    dtypes = sorted({_dtype_name(model.dtype(name)) for name in model.names})
    return (
        f"model: {model.label}: {source.config.get('model_type')}, {len(source.moe_layers)} MoE layers × "
        f"{source.num_experts} experts ({source.experts_per_token} per token)"
        f"{', shared expert' if source.has_shared_expert else ''}"
        f"{', fused expert tensors' if source.fused else ''}, {len(model.names)} tensors, {format_bytes(size)} "
        f"({', '.join(dtypes)})"
    )


def calibration_line(usage: RouterUsage | None, score: str | None) -> list[str]:
    if usage is None:
        return []
    scored = f"; experts ranked by {score}" if score else ""
    return [f"calibration: {usage.tokens} tokens{scored}"]


def output_line(output: SplitOutput, target: Path) -> str:
    return (
        f"output: {target}: {output.title}, {output.config.get('model_type')}, {len(output.tensors)} tensors, "
        f"{format_bytes(_size(output))} ({_dtypes(output)})"
    )


def folder_table(outputs: list[SplitOutput]) -> list[str]:
    """--all-experts: one row per output folder (each layer of expert-NN takes expert NN), and the total."""
    rows = [["folder", "dense MLP from", "tensors", "size"]]
    for output in outputs:
        expert = next(iter(output.layers.values()))["experts"][0] if output.layers else "-"
        rows.append([output.folder_name, f"expert {expert} in every layer", str(len(output.tensors))])
        rows[-1].append(format_bytes(_size(output)))
    rows.append(
        [
            "total",
            f"{len(outputs)} folders",
            str(sum(len(output.tensors) for output in outputs)),
            format_bytes(sum(_size(output) for output in outputs)),
        ]
    )
    return format_table(rows)


def describe_split(
    source: MoeSource,
    outputs: list[SplitOutput],
    out: Path,
    usage: RouterUsage | None = None,
    *,
    score: str | None = None,
    per_tensor: bool = False,
) -> str:
    """The --dry-run plan: the MoE, each output's size, then its per-layer table (per tensor with -v)."""
    lines = [source_line(source), *calibration_line(usage, score)]
    if len(outputs) > 1:
        size = sum(_size(output) for output in outputs)
        lines += [f"output: {out}: {len(outputs)} model folders, {format_bytes(size)}", "", *folder_table(outputs)]
        if not per_tensor:
            return "\n".join(lines)
    for output in outputs:
        target = out / output.folder_name if output.folder_name else out
        lines += [output_line(output, target), "", *layer_table(output, source, usage, per_tensor=per_tensor), ""]
    return "\n".join(lines).rstrip("\n")
