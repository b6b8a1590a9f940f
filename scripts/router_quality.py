"""Held-out perplexity per domain of dense merges and frankenMoEs with each router, on the trained domain models.

    python scripts/train_domain_experts.py --out .bench/domains
    python scripts/router_quality.py .bench/domains --readme README.md

Builds, from OUT/base and the fine-tunes OUT/code and OUT/prose: a 0.5/0.5 linear merge and a TIES merge of
the fine-tunes (moemerge-yaml), and Mixtral MoEs of the two fine-tunes over the base (moemerge-moe) with
`gate_mode: hidden` (mergekit's definition: the state entering each layer, five prompts per expert),
`hidden --router-input mlp` (the state the router multiplies), and `gate_mode: fitted` with source labels
and with loss labels, each at top-1 and top-2. Every model is scored on the same held-out windows of each
domain; the oracle scores each domain with its own fine-tune. Results: printed table, OUT/routers.json,
and with --readme the table between the `<!-- routers-table -->` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from quality_data import heldout_perplexity  # noqa: E402

DOMAINS = ("code", "prose")
MARKERS = ("<!-- routers-table -->", "<!-- /routers-table -->")


def prompts_from(text: str, count: int = 5, chars: int = 300) -> list[str]:
    """`count` passages of about `chars` characters spread evenly over a text (cut at line ends)."""
    passages = []
    for index in range(count):
        start = text.find("\n", len(text) * index // count) + 1
        passages.append(text[start : start + chars].rsplit("\n", 1)[0].strip() or text[start : start + chars])
    return passages


def invoke(command, args: list[str]) -> float:
    started = time.perf_counter()
    result = CliRunner().invoke(command, [str(a) for a in args] + ["--quiet", "--overwrite"])
    if result.exit_code != 0:
        sys.exit(f"failed: {args}\n{result.output}\n{result.exception!r}")
    return time.perf_counter() - started


def build(folder: Path, work: Path, rebuild: bool) -> dict[str, Path]:
    from moemerge.cli.moe_command import main as moe_main
    from moemerge.cli.yaml_command import main as yaml_main

    models = {"base": folder / "base", "code fine-tune": folder / "code", "prose fine-tune": folder / "prose"}
    tuned = [str(folder / d) for d in DOMAINS]
    dense = {
        "linear 0.5/0.5": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in tuned],
        },
        "TIES (density 0.5)": {
            "merge_method": "ties",
            "base_model": str(folder / "base"),
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in tuned],
        },
    }
    for name, recipe in dense.items():
        recipe_file = work / f"{len(models)}.yml"
        recipe_file.write_text(yaml.safe_dump({**recipe, "dtype": "float32"}))
        models[name] = work / f"dense-{len(models)}"
        invoke(yaml_main, [recipe_file, models[name]])
    texts = {d: (folder / f"calibration-{d}.txt").read_text(encoding="utf-8") for d in DOMAINS}
    variants = [
        ("MoE hidden (mergekit)", "hidden", []),
        ("MoE hidden, router input", "hidden", ["--router-input", "mlp"]),
        ("MoE fitted, source labels", "fitted", []),
        ("MoE fitted, loss labels", "fitted", ["--fit-labels", "loss"]),
    ]
    for label, gate_mode, options in variants:
        for top_k in (1, 2):
            experts = []
            for domain in DOMAINS:
                entry = {"source_model": str(folder / domain), "positive_prompts": prompts_from(texts[domain])}
                if gate_mode == "fitted":
                    entry["calibration_files"] = [str(folder / f"calibration-{domain}.txt")]
                experts.append(entry)
            recipe = {
                "base_model": str(folder / "base"),
                "gate_mode": gate_mode,
                "dtype": "float32",
                "experts_per_token": top_k,
                "experts": experts,
            }
            name = f"{label}, top-{top_k}"
            recipe_file = work / f"moe-{len(models)}.yml"
            recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
            models[name] = work / f"moe-{len(models)}"
            if (models[name] / "config.json").is_file() and not rebuild:
                continue
            seconds = invoke(moe_main, [recipe_file, models[name], *options])
            print(f"built {name} in {seconds:.0f} s", flush=True)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--windows", type=int, default=64, help="held-out windows per domain")
    parser.add_argument("--window", type=int, default=96)
    parser.add_argument("--readme", type=Path)
    parser.add_argument("--rebuild", action="store_true", help="rebuild MoEs already in OUT/routers")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    folder = args.folder.resolve()
    work = folder / "routers"
    work.mkdir(exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    heldout = {}
    for domain in DOMAINS:
        ids = tokenizer((folder / f"heldout-{domain}.txt").read_text(encoding="utf-8"))["input_ids"]
        step = max(args.window, len(ids) // args.windows)
        heldout[domain] = [t for start in range(0, step * args.windows, step) for t in ids[start : start + args.window]]
    models = build(folder, work, args.rebuild)
    rows = {}
    for name, model in models.items():
        scores = {d: heldout_perplexity(model, heldout[d], window=args.window).perplexity for d in DOMAINS}
        rows[name] = {**scores, "geo_mean": math.sqrt(scores["code"] * scores["prose"])}
        print(f"{name}: {rows[name]}", flush=True)
    oracle = {"code": rows["code fine-tune"]["code"], "prose": rows["prose fine-tune"]["prose"]}
    rows["oracle (each domain by its own fine-tune)"] = {
        **oracle,
        "geo_mean": math.sqrt(oracle["code"] * oracle["prose"]),
    }
    (folder / "routers.json").write_text(json.dumps(rows, indent=1))
    best_dense = min(rows[n]["geo_mean"] for n in ("linear 0.5/0.5", "TIES (density 0.5)"))
    target = best_dense - (best_dense - rows["oracle (each domain by its own fine-tune)"]["geo_mean"]) / 2
    lines = [
        "| model | code ppl | prose ppl | geo-mean |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {r['code']:.2f} | {r['prose']:.2f} | {r['geo_mean']:.2f} |" for n, r in rows.items()),
    ]
    table = "\n".join(lines)
    print(table)
    print(f"best dense {best_dense:.2f}; half-way to the oracle: {target:.2f}")
    if args.readme:
        text = args.readme.read_text()
        start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
        args.readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    main()
