"""Expert-usage report: a heatmap PNG (layers × experts) and the numbers behind it as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from moemerge.errors import MoemergeError
from moemerge.split.usage import RouterUsage


def require_matplotlib() -> None:
    """Fail before calibration, not after it, when the optional plotting extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoemergeError("--report needs matplotlib: pip install 'moemerge[report]'") from None


def json_path(png_path: Path) -> Path:
    return Path(png_path).with_suffix(".json")


def write_report(png_path: Path, usage: RouterUsage, *, model_label: str, selection: dict) -> Path:
    """Write the heatmap and `<name>.json` beside it; returns the JSON path."""
    png_path = Path(png_path)
    try:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": model_label, **usage.to_dict(), "selection": selection}
        json_file = json_path(png_path)
        json_file.write_text(json.dumps(data, indent=2) + "\n")
        _heatmap(png_path, usage, model_label)
    except OSError as error:
        raise MoemergeError(f"--report {png_path}: cannot write it ({error.strerror or error})") from None
    return json_file


def _heatmap(png_path: Path, usage: RouterUsage, model_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = usage.frequency[usage.moe_layers].numpy() if usage.moe_layers else usage.frequency.numpy()
    layers, experts = share.shape
    figure, axes = plt.subplots(figsize=(max(4.0, 0.35 * experts + 2), max(3.0, 0.3 * layers + 1.5)))
    image = axes.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(layers), [str(layer) for layer in (usage.moe_layers or range(layers))])
    axes.set_title(f"{model_label}: share of {usage.tokens} calibration tokens routed to each expert", fontsize=9)
    figure.colorbar(image, ax=axes, label="share of tokens")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
