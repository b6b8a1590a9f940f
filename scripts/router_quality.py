"""Held-out perplexity per domain of dense merges and frankenMoEs with each router, on the trained domain models.

    python scripts/train_domain_experts.py --out .bench/domains
    python scripts/router_quality.py .bench/domains --readme README.md

Builds, from OUT/base and the fine-tunes OUT/code and OUT/prose: a 0.5/0.5 linear merge and a TIES merge of
the fine-tunes (moemerge-yaml), and Mixtral MoEs of the two fine-tunes over the base (moemerge-moe) with
`gate_mode: hidden` (mergekit's definition: the state entering each layer, five prompts per expert),
`hidden --router-input mlp` (the state the router multiplies), and `gate_mode: fitted` with source, loss and
posterior labels (and the base's MLP as a third expert), each at top-1 and top-2. Every model is scored on the
same held-out windows of each domain; the oracle scores each domain with its own fine-tune, the ceiling with
the base carrying that fine-tune's MLPs (an MoE whose router is fixed to that domain's expert). Results: the
printed tables (perplexity; routing accuracy per layer), OUT/routers.json, and with --readme the tables between
the `<!-- MARKER -->` and `<!-- /MARKER -->` lines (--marker, default routers-table).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
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


def prompts_from(text: str, count: int = 5, chars: int = 300) -> list[str]:
    """`count` passages of about `chars` characters spread evenly over a text (cut at line ends)."""
    passages = []
    for index in range(count):
        start = text.find("\n", len(text) * index // count) + 1
        passages.append(text[start : start + chars].rsplit("\n", 1)[0].strip() or text[start : start + chars])
    return passages


def geo_mean(scores: dict[str, float]) -> float:
    return math.exp(sum(math.log(scores[d]) for d in DOMAINS) / len(DOMAINS))


def invoke(command, args: list[str]) -> float:
    started = time.perf_counter()
    result = CliRunner().invoke(command, [str(a) for a in args] + ["--quiet", "--overwrite"])
    if result.exit_code != 0:
        sys.exit(f"failed: {args}\n{result.output}\n{result.exception!r}")
    return time.perf_counter() - started


def forced_expert_model(base: Path, expert: Path, out: Path) -> Path:
    """The base with one fine-tune's MLPs: what an MoE computes when its router sends every token of a text to that
    expert (top-1, or top-k with the weights renormalised to 1), so no router can do better on that text."""
    from safetensors.torch import load_file, save_file

    weights = load_file(base / "model.safetensors")
    mlps = {name: tensor for name, tensor in load_file(expert / "model.safetensors").items() if ".mlp." in name}
    assert mlps and mlps.keys() <= weights.keys()
    out.mkdir(parents=True, exist_ok=True)
    save_file({**weights, **mlps}, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    return out


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
    for domain in DOMAINS:
        models[f"forced: base + {domain} MLPs"] = forced_expert_model(
            folder / "base", folder / domain, work / f"forced-{domain}"
        )
    texts = {d: (folder / f"calibration-{d}.txt").read_text(encoding="utf-8") for d in DOMAINS}
    variants = [  # (row label, gate_mode, CLI options, the base's MLP as a third expert)
        ("MoE hidden (mergekit)", "hidden", [], False),
        ("MoE hidden, router input", "hidden", ["--router-input", "mlp"], False),
        ("MoE fitted, source labels", "fitted", ["--fit-labels", "source"], False),
        ("MoE fitted, loss labels", "fitted", ["--fit-labels", "loss"], False),
        ("MoE fitted, loss labels, base MLP as 3rd expert", "fitted", ["--fit-labels", "loss"], True),
        ("MoE fitted, posterior labels", "fitted", ["--fit-labels", "posterior", "--fit-window", "1"], False),
        ("MoE fitted, posterior labels over 32 tokens", "fitted", [], False),
    ]
    for label, gate_mode, options, with_base in variants:
        for top_k in (1, 2):
            experts = []
            for domain in DOMAINS:
                entry = {"source_model": str(folder / domain), "positive_prompts": prompts_from(texts[domain])}
                if gate_mode == "fitted":
                    entry["calibration_files"] = [str(folder / f"calibration-{domain}.txt")]
                experts.append(entry)
            if with_base:  # loss labels decide where it goes; its own prompts only mark the last token of each
                prompts = [p for d in DOMAINS for p in prompts_from(texts[d])]
                experts.append({"source_model": str(folder / "base"), "positive_prompts": prompts})
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
            cpu = time.process_time()
            seconds = invoke(moe_main, [recipe_file, models[name], *options])
            cpu_seconds = time.process_time() - cpu
            (models[name] / "build_seconds.json").write_text(json.dumps({"wall": seconds, "cpu": cpu_seconds}))
            print(f"built {name} in {seconds:.0f} s ({cpu_seconds:.0f} CPU s)", flush=True)
    return models


def heldout_routing(model_folder: Path, token_ids: list[int], expert: int, window: int = 96) -> list[float]:
    """Per layer, the share of held-out tokens whose top-1 router choice is `expert` (their domain's expert)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    picks: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate
        hooks.append(
            gate.register_forward_pre_hook(
                lambda m, args, index=index: picks.setdefault(index, []).append(
                    torch.nn.functional.linear(args[0].reshape(-1, args[0].shape[-1]), m.weight).argmax(dim=-1)
                )
            )
        )
    with torch.no_grad():
        for start in range(0, len(token_ids) - window + 1, window):
            model(torch.tensor([token_ids[start : start + window]]))
    for hook in hooks:
        hook.remove()
    return [float((torch.cat(picks[i]) == expert).float().mean()) for i in sorted(picks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--windows", type=int, default=64, help="held-out windows per domain")
    parser.add_argument("--window", type=int, default=96)
    parser.add_argument("--readme", type=Path)
    parser.add_argument("--marker", default="routers-table", help="README markers <!-- NAME --> <!-- /NAME -->")
    parser.add_argument("--rebuild", action="store_true", help="rebuild MoEs already in OUT/routers")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)  # a busy shared machine: one thread avoids OpenMP threads waiting on each other
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
        rows[name] = {**scores, "geo_mean": geo_mean(scores)}
        print(f"{name}: {rows[name]}", flush=True)
    ceiling = {d: rows[f"forced: base + {d} MLPs"][d] for d in DOMAINS}
    rows["MoE ceiling (router fixed to each domain's expert)"] = {**ceiling, "geo_mean": geo_mean(ceiling)}
    oracle = {d: rows[f"{d} fine-tune"][d] for d in DOMAINS}
    rows["oracle (each domain by its own fine-tune)"] = {**oracle, "geo_mean": geo_mean(oracle)}
    accuracy = {}
    for name, model in models.items():
        fit = model / "moemerge_router_fit.json"
        if fit.is_file():
            layers = json.loads(fit.read_text())["layers"]
            accuracy[name] = [layers[str(layer)]["held_out_accuracy"] for layer in range(len(layers))]
            for expert, domain in enumerate(DOMAINS):
                accuracy[f"{name}: held-out {domain} text to the {domain} expert"] = heldout_routing(
                    model, heldout[domain], expert, args.window
                )
    results = {"perplexity": rows, "held_out_routing_accuracy": accuracy}
    (folder / "routers.json").write_text(json.dumps(results, indent=1))
    best_dense = min(rows[n]["geo_mean"] for n in ("linear 0.5/0.5", "TIES (density 0.5)"))
    target = best_dense - (best_dense - rows["oracle (each domain by its own fine-tune)"]["geo_mean"]) / 2
    lines = [
        "| model | code ppl | prose ppl | geo-mean |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {r['code']:.2f} | {r['prose']:.2f} | {r['geo_mean']:.2f} |" for n, r in rows.items()),
        "",
        "| fitted MoE | held-out routing accuracy per layer (0, 1, ...) |",
        "|---|---|",
        *(f"| {n} | {', '.join(f'{a:.3f}' for a in acc)} |" for n, acc in accuracy.items()),
    ]
    table = "\n".join(lines)
    print(table)
    print(f"best dense {best_dense:.2f}; half-way to the oracle: {target:.2f}")
    if args.readme:
        markers = (f"<!-- {args.marker} -->", f"<!-- /{args.marker} -->")
        text = args.readme.read_text()
        start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
        args.readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    main()
