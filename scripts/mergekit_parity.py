"""Run the same recipes through moemerge and mergekit on small generated models; print how far apart they are.

    python scripts/mergekit_parity.py --mergekit-python /work/mkvenv/bin/python
    python scripts/mergekit_parity.py --mergekit-python /work/mkvenv/bin/python --only nuslerp multislerp

Models come from `moemerge/toys.py` (a Llama base and three fine-tunes, float32, plus bfloat16 copies for
`dtype: bfloat16` recipes). moemerge runs in-process, mergekit as `mergekit-yaml` next to the given python.
For each recipe: the largest |moemerge − mergekit| over every tensor (compared in float64) and the tensor
whose difference it is. Random methods (DARE, DELLA) draw from different generators in the two tools: their
row shows the difference of independent draws, and a second column the mean fraction of entries that moved.
Add a recipe by appending to RECIPES: model names are the keys of `make_models`' dict.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
FINE_TUNES = ("coder", "math", "story")


def _models(names, parameters=None):
    """`models:` entries, with per-model parameters when given."""
    entries = [{"model": name} for name in names]
    for entry, params in zip(entries, parameters or [], strict=False):
        entry["parameters"] = dict(params)
    return entries


def _weighted(weights, **extra):
    return [{"weight": weight, **extra} for weight in weights]


# name -> recipe (model names stand for the generated folders); "random": masks differ by construction
RECIPES: dict[str, dict] = {
    "linear": {"merge_method": "linear", "models": _models(FINE_TUNES, _weighted([0.5, 0.3, 0.2]))},
    "linear-bf16": {
        "merge_method": "linear",
        "models": _models(["coder-bf16", "math-bf16", "story-bf16"], _weighted([1.0, 1.0, 1.0])),
        "dtype": "bfloat16",
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": _models(FINE_TUNES, _weighted([0.5, 0.7, 0.3])),
        "parameters": {"lambda": 0.9},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": _models(FINE_TUNES, _weighted([1.0, 0.6, 0.4], density=0.5)),
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "base",
        "models": _models(FINE_TUNES, _weighted([1.0, 0.6, 0.4], density=0.6, gamma=0.05)),
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "coder",
        "models": _models(["coder", "math"]),
        "parameters": {"t": [0.0, 0.3, 1.0]},
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": _models(FINE_TUNES, _weighted([1.0, 0.6, 0.4], density=0.5)),
        "random": True,
    },
    "della": {
        "merge_method": "della",
        "base_model": "base",
        "models": _models(FINE_TUNES, _weighted([1.0, 0.6, 0.4], density=0.5, epsilon=0.1)),
        "random": True,
    },
    "della_linear": {
        "merge_method": "della_linear",
        "base_model": "base",
        "models": _models(FINE_TUNES, _weighted([0.5, 0.3, 0.2], density=0.6)),
        "parameters": {"lambda": 1.1},
        "random": True,
    },
    "della-density1": {  # no drop: deterministic, checks the rest of the pipeline
        "merge_method": "della",
        "base_model": "base",
        "models": _models(FINE_TUNES, _weighted([1.0, 0.6, 0.4])),
    },
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": _models(FINE_TUNES)},
    "model_stock-filter_wise": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": _models(FINE_TUNES),
        "parameters": {"filter_wise": True},
    },
    "nuslerp-base": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": _models(["coder", "math"], _weighted([0.7, 0.3])),
    },
    "nuslerp-rows": {
        "merge_method": "nuslerp",
        "models": _models(["coder", "math"], _weighted([0.4, 0.6])),
        "parameters": {"nuslerp_flatten": False},
    },
    "nuslerp-columns": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": _models(["coder", "math"], _weighted([0.4, 0.6])),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "multislerp": {"merge_method": "multislerp", "models": _models(FINE_TUNES, _weighted([0.2, 0.3, 0.5]))},
    "multislerp-base": {
        "merge_method": "multislerp",
        "base_model": "base",
        "models": _models(FINE_TUNES, _weighted([1.0, 1.0, 2.0])),
        "parameters": {"normalize_weights": True},
    },
    "karcher": {
        "merge_method": "karcher",
        "models": _models(FINE_TUNES),
        "parameters": {"max_iter": 20, "tol": 1e-7},
    },
    "karcher-base": {"merge_method": "karcher", "base_model": "base", "models": _models(["coder", "math"])},
    "sce": {
        "merge_method": "sce",
        "base_model": "base",
        "models": _models(FINE_TUNES),
        "parameters": {"select_topk": 0.5},
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "base",
        "models": _models(["coder"]),
        "parameters": {"t": 0.005},
    },
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "models": _models(["math"])},
    "ram": {
        "merge_method": "ram",
        "base_model": "base",
        "models": _models(FINE_TUNES),
        "parameters": {"epsilon": 0.02},
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": "base",
        "models": _models(FINE_TUNES),
        "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 0.5},
    },
}


def make_models(folder: Path) -> dict[str, Path]:
    """A Llama base, three fine-tunes (float32) and bfloat16 copies of the fine-tunes and base."""
    from moemerge.toys import make_toy_model

    base = make_toy_model(folder / "base", "llama", seed=0)
    models = {"base": base}
    for name, seed in zip(FINE_TUNES, (1, 2, 3), strict=True):
        models[name] = make_toy_model(folder / name, "llama", seed=seed, base=base, delta_scale=0.05)
    models["base-bf16"] = make_toy_model(folder / "base-bf16", "llama", seed=0, dtype=torch.bfloat16)
    for name, seed in zip(FINE_TUNES, (1, 2, 3), strict=True):
        models[f"{name}-bf16"] = make_toy_model(
            folder / f"{name}-bf16", "llama", seed=seed, base=base, delta_scale=0.05, dtype=torch.bfloat16
        )
    return models


def resolve(recipe: dict, models: dict[str, Path]) -> dict:
    """The recipe with model names replaced by folders (and the script's own keys removed)."""
    resolved = {key: value for key, value in recipe.items() if key != "random"}
    if "base_model" in resolved:
        resolved["base_model"] = str(models[resolved["base_model"]])
    resolved["models"] = [{**entry, "model": str(models[entry["model"]])} for entry in resolved["models"]]
    return resolved


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def run_moemerge(config: Path, out: Path, seed: int) -> None:
    from click.testing import CliRunner

    from moemerge.cli.yaml_command import main

    args = [str(config), str(out), "--random-seed", str(seed), "--quiet", "--no-copy-tokenizer", "--overwrite"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"moemerge-yaml failed: {result.output.strip()}")


def run_mergekit(mergekit_yaml: Path, config: Path, out: Path, seed: int) -> None:
    command = [str(mergekit_yaml), str(config), str(out), "--random-seed", str(seed), "--quiet"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed: {completed.stderr.strip().splitlines()[-1:]}")


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str, float]:
    """(max |ours − theirs|, the tensor where it is, the fraction of entries that differ at all)."""
    if set(ours) != set(theirs):
        raise RuntimeError(f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:4]}")
    worst, where, differing, total = 0.0, "", 0, 0
    for name in sorted(ours):
        if ours[name].shape != theirs[name].shape:
            raise RuntimeError(f"{name}: shape {list(ours[name].shape)} vs {list(theirs[name].shape)}")
        difference = (ours[name].double() - theirs[name].double()).abs()
        differing += int(torch.count_nonzero(difference))
        total += difference.numel()
        if float(difference.max()) > worst:
            worst, where = float(difference.max()), name
    return worst, where, differing / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit-python", type=Path, required=True, help="a python with mergekit installed")
    parser.add_argument("--only", nargs="*", help="recipe names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep models and outputs here (default: a temporary folder)")
    arguments = parser.parse_args()
    mergekit_yaml = arguments.mergekit_python.parent / "mergekit-yaml"
    if not mergekit_yaml.exists():
        parser.error(f"{mergekit_yaml} not found next to --mergekit-python")
    names = arguments.only or list(RECIPES)
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    with tempfile.TemporaryDirectory() as scratch:
        work = arguments.workdir or Path(scratch)
        models = make_models(work / "models")
        print("| recipe | method | max abs diff | where | entries differing | note |")
        print("|---|---|---:|---|---:|---|")
        failures = 0
        for name in names:
            recipe = RECIPES[name]
            config = work / "recipes" / f"{name}.yml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump(resolve(recipe, models), sort_keys=False))
            note = "random masks: independent draws" if recipe.get("random") else ""
            try:
                started = time.perf_counter()
                run_moemerge(config, work / "out" / f"moemerge-{name}", arguments.seed)
                run_mergekit(mergekit_yaml, config, work / "out" / f"mergekit-{name}", arguments.seed)
                worst, where, fraction = compare(
                    read_all(work / "out" / f"moemerge-{name}"), read_all(work / "out" / f"mergekit-{name}")
                )
                print(
                    f"| {name} | {recipe['merge_method']} | {worst:.3g} | {where or '-'} | {fraction:.2%} | {note} |"
                    + f" <!-- {time.perf_counter() - started:.0f} s -->",
                    flush=True,
                )
            except RuntimeError as error:
                failures += 1
                print(f"| {name} | {recipe['merge_method']} | failed | | | {error} |", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
