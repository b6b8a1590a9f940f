"""Expert-usage report: a heatmap PNG (layers × experts) and the numbers behind it as JSON.

The heatmap shows, per MoE layer and expert, the share of calibration tokens the router sent there. Experts kept
by `--prune-to` (or joined into the dense MLP by `--select`) are outlined, pruned ones dimmed; on grids small
enough to read, each cell carries its number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moemerge.errors import MoemergeError, install_hint
from moemerge.split.usage import RouterUsage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = install_hint("report", "matplotlib")
MAX_ANNOTATED_CELLS = 16 * 32  # beyond this the numbers no longer fit in the cells
MAX_TICK_LABELS = 32  # per axis; more experts or layers get every n-th label


@dataclass(frozen=True)
class ReportMarks:
    """Experts to outline per layer (kept by --prune-to, or in the dense MLP for --select), and whether the rest
    were pruned (dimmed)."""

    label: str  # legend text for the outlined experts
    experts: dict[int, list[int]] = field(default_factory=dict)  # layer → experts
    pruned: bool = False


def require_matplotlib() -> None:
    """Fail before calibration, not after it, when the optional plotting extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoemergeError(f"--report needs matplotlib: {INSTALL_HINT}") from None


def json_path(png_path: Path) -> Path:
    return Path(png_path).with_suffix(".json")


def report_title(model_label: str) -> str:
    """A short title: the model folder's (or repo's) last name."""
    return f"Expert usage: {Path(model_label.rstrip('/')).name or model_label}"


def report_caption(usage: RouterUsage, experts_per_token: int | None, marks: ReportMarks | None) -> str:
    """What a cell is, the router's top-k, and what the marks mean."""
    experts = usage.counts.shape[1]
    top_k = f"top-{experts_per_token} of {experts} experts per token" if experts_per_token else f"{experts} experts"
    caption = f"Share of {usage.tokens} calibration tokens routed to each expert ({top_k})"
    if marks is not None:
        caption += f"; outlined: {marks.label}" + ("; dimmed: pruned" if marks.pruned else "")
    return caption


def write_report(
    png_path: Path,
    usage: RouterUsage,
    *,
    model_label: str,
    selection: dict,
    experts_per_token: int | None = None,
    marks: ReportMarks | None = None,
) -> Path:
    """Write the heatmap and `<name>.json` beside it; returns the JSON path."""
    png_path = Path(png_path)
    try:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": model_label, "experts_per_token": experts_per_token, **usage.to_dict(), "selection": selection}
        json_file = json_path(png_path)
        json_file.write_text(json.dumps(data, indent=2) + "\n")
        figure = usage_figure(usage, model_label=model_label, experts_per_token=experts_per_token, marks=marks)
        title, caption = report_title(model_label), report_caption(usage, experts_per_token, marks)
        figure.savefig(png_path, dpi=120, metadata={"Title": title, "Description": caption, "Software": "moemerge"})
    except OSError as error:
        raise MoemergeError(f"--report {png_path}: cannot write it ({error.strerror or error})") from None
    return json_file


def _ticks(count: int) -> list[int]:
    """Every n-th index, so that at most MAX_TICK_LABELS integer labels show."""
    return list(range(0, count, max(1, math.ceil(count / MAX_TICK_LABELS))))


def usage_figure(
    usage: RouterUsage, *, model_label: str, experts_per_token: int | None = None, marks: ReportMarks | None = None
) -> Figure:
    """The heatmap as a matplotlib Figure (layers as rows, experts as columns), not yet saved."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    layers = usage.moe_layers or list(range(usage.counts.shape[0]))
    share = usage.frequency[layers].numpy()
    rows, experts = share.shape
    figure = Figure(figsize=(min(16.0, max(4.5, 0.45 * experts + 2.5)), min(12.0, max(3.5, 0.35 * rows + 2.2))))
    axes = figure.add_subplot()
    image = axes.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_xticks(_ticks(experts), [str(expert) for expert in _ticks(experts)])
    axes.set_yticks(_ticks(rows), [str(layers[row]) for row in _ticks(rows)])
    axes.set_title(report_title(model_label), fontsize=10)
    figure.colorbar(image, ax=axes, label="share of tokens")
    dimmed: set[tuple[int, int]] = set()  # (row, expert) of pruned experts
    if marks is not None:
        for row, layer in enumerate(layers):
            marked = set(marks.experts.get(layer, []))
            for expert in range(experts):
                if expert in marked:
                    outline = Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
                    outline.set_gid("kept")
                    axes.add_patch(outline)
                elif marks.pruned and layer in marks.experts:
                    dim = Rectangle((expert - 0.5, row - 0.5), 1, 1, facecolor="white", alpha=0.6, linewidth=0)
                    dim.set_gid("pruned")
                    axes.add_patch(dim)
                    dimmed.add((row, expert))
        handles = [Patch(fill=False, edgecolor="red", linewidth=2, label=marks.label)]
        if marks.pruned:
            handles.append(Patch(facecolor="white", alpha=0.6, edgecolor="grey", label="pruned (dimmed)"))
        axes.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.07), ncol=2, fontsize=7, frameon=False)
    if rows * experts <= MAX_ANNOTATED_CELLS:
        middle = (float(share.max()) + float(share.min())) / 2
        for row in range(rows):
            for expert in range(experts):
                value = float(share[row, expert])
                dark = value <= middle and (row, expert) not in dimmed
                axes.text(expert, row, f"{value:.2f}", ha="center", va="center", fontsize=7, gid="share",
                          color="white" if dark else "black")  # fmt: skip
    figure.text(0.5, 0.01, report_caption(usage, experts_per_token, marks), ha="center", va="bottom", fontsize=7,
                wrap=True, gid="caption")  # fmt: skip
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return figure
