"""Generate the seeded toy models that the demo and the example recipes in configs/ use.

toy-models/base, coder, math, story:                      Llama-style; the last three are base + small deltas
toy-models/mistral-base, mistral-coder, -math, -story:    Mistral-style, for the MoE example
toy-models/qwen2-base, qwen2-coder, qwen2-story (and qwen3-): for configs/moe-qwen2.yml and moe-qwen3.yml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moemerge.toys import make_toy_model

FINE_TUNES = {"coder": 1, "math": 2, "story": 3}


def make_all(root: Path) -> Path:
    """Build every toy model that is not there yet; returns `root`."""
    for family, prefix in (("llama", ""), ("mistral", "mistral-")):
        base = root / f"{prefix}base"
        if not (base / "config.json").is_file():
            make_toy_model(base, family, seed=0)
        for name, seed in FINE_TUNES.items():
            folder = root / f"{prefix}{name}"
            if not (folder / "config.json").is_file():
                make_toy_model(folder, family, seed=seed, base=base, delta_scale=0.05)
    for family in ("qwen2", "qwen3"):
        base = root / f"{family}-base"
        if not (base / "config.json").is_file():
            make_toy_model(base, family, seed=30)
        for name, seed in (("coder", 31), ("story", 32)):
            folder = root / f"{family}-{name}"
            if not (folder / "config.json").is_file():
                make_toy_model(folder, family, seed=seed, base=base, delta_scale=0.5)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="toy-models", type=Path)
    print(f"toy models in {make_all(parser.parse_args().root)}")
