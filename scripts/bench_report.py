"""Render `scripts/bench.py` results as the README's performance tables.

    python scripts/bench_report.py                          # print the tables
    python scripts/bench_report.py --readme README.md       # replace the text between the bench-table markers
    python scripts/bench_report.py --gpu .bench/gpu/results.json --readme README.md   # GPU rows from a GPU machine

Reads `.bench/results.json` (written by bench.py); rows with a mergekit run get the ratios the
performance issue sets targets for, rows of other layer counts give the memory-vs-model-size check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench-table -->", "<!-- /bench-table -->"
# the issue-15 targets (warm cache, 2 cores): copy-bound recipes against the I/O floor, TIES-family and random-drop
# methods and the MoE against mergekit's wall; every row's peak RSS at most half of mergekit's
COPY_BOUND = ("linear", "task_arithmetic", "passthrough", "slerp", "moe")
TIES_FAMILY = ("ties", "breadcrumbs", "breadcrumbs_ties", "sce", "dare_ties", "dare_linear", "della", "della_linear")
ORDER = COPY_BOUND + TIES_FAMILY
FLOOR_TARGET, TIES_TARGET, MOE_TARGET, RSS_TARGET = 2.0, 0.2, 0.5, 0.5


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}" if numerator and denominator else "–"


def _seconds(figures: dict) -> str:
    return f"{figures['wall_s']:.1f}" if figures else "–"


def _cpu(figures: dict) -> str:
    return f"{figures['cpu_s']:.1f}" if figures.get("cpu_s") is not None else "–"


def _gb(megabytes: float) -> str:
    return f"{megabytes / 1000:.2f}"


VARIANTS = (("", "cold", "float32"), ("-bf16", "cold", "bfloat16"), ("-warm", "warm", "float32"),
            ("-bf16-warm", "warm", "bfloat16"))  # fmt: skip


def _recipes(results: dict) -> list[str]:
    """Recipe names in the results: copy-bound, then the TIES family, then the others alphabetically."""
    names = {row["recipe"] for row in results.values() if isinstance(row, dict) and "recipe" in row}
    return [name for name in ORDER if name in names] + sorted(names - set(ORDER))


def _rows(results: dict, layers: int, label: str = "") -> list[dict]:
    rows = [results.get(f"{name}-{layers}L{label}") for name in _recipes(results)]
    return [row for row in rows if row and row.get("moemerge", {}).get("ok")]


def targets(name: str, cache: str) -> list[tuple[str, str, float]]:
    """(label, measure, bound) pairs the issue sets for this recipe: measure is 'floor', 'mergekit' or 'rss'."""
    wanted = [("RSS", "rss", RSS_TARGET)]
    if cache == "warm" and name in COPY_BOUND:
        wanted.insert(0, (f"≤ {FLOOR_TARGET:g}× floor", "floor", FLOOR_TARGET))
    if cache == "warm" and name in TIES_FAMILY:
        wanted.insert(0, (f"≤ {TIES_TARGET:g}× mergekit", "mergekit", TIES_TARGET))
    if cache == "warm" and name == "moe":
        wanted.insert(1, (f"≤ {MOE_TARGET:g}× mergekit", "mergekit", MOE_TARGET))
    return wanted


def verdict(name: str, cache: str, ours: dict, theirs: dict, floor: float) -> tuple[str, str]:
    """(the targets, in words; 'yes' or what missed) for one measured row."""
    values = {
        "floor": ours["wall_s"] / floor if floor else None,
        "mergekit": ours["wall_s"] / theirs["wall_s"] if theirs else None,
        "rss": ours["peak_rss_mb"] / theirs["peak_rss_mb"] if theirs else None,
    }
    wanted = targets(name, cache)
    missed = [
        {"rss": "RSS {:.2f}×", "floor": "wall {:.2f}× floor", "mergekit": "wall {:.2f}× mergekit"}[measure].format(
            values[measure]
        )
        for _, measure, bound in wanted
        if values[measure] is not None and values[measure] > bound
    ]
    unknown = all(values[measure] is None for _, measure, _ in wanted)
    words = ", ".join(label for label, measure, _ in wanted if measure != "rss")
    return words or "–", "–" if unknown else ("no: " + ", ".join(missed) if missed else "yes")


def matrix_table(results: dict) -> str:
    """Every recipe in each cache state and math dtype measured: against mergekit, the I/O floor and the targets."""
    lines = [
        "| recipe | cache | math dtype | moemerge wall s | mergekit wall s | wall ratio | I/O floor s "
        "| moemerge / floor | peak RSS GB, moemerge / mergekit | RSS ratio | CPU s, moemerge / mergekit "
        "| wall target | targets met (RSS ≤ 0.5× too) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name in _recipes(results):
        for suffix, cache, dtype in VARIANTS:
            row = results.get(f"{name}-8L{suffix}")
            if not row or not row.get("moemerge", {}).get("ok"):
                continue
            ours, theirs = row["moemerge"], row.get("mergekit", {})
            theirs = theirs if theirs.get("ok") else {}
            target, met = verdict(name, cache, ours, theirs, row["io_floor_s"])
            lines.append(
                f"| {name} | {cache} | {dtype} | {ours['wall_s']:.1f} | {_seconds(theirs)} "
                f"| {_ratio(ours['wall_s'], theirs.get('wall_s'))} | {row['io_floor_s']:.1f} "
                f"| {_ratio(ours['wall_s'], row['io_floor_s'])} "
                f"| {_gb(ours['peak_rss_mb'])} / {_gb(theirs['peak_rss_mb']) if theirs else '–'} "
                f"| {_ratio(ours['peak_rss_mb'], theirs.get('peak_rss_mb'))} | {ours['cpu_s']:.1f} / {_cpu(theirs)} "
                f"| {target} | {met} |"
            )
    return "\n".join(lines)


def size_table(results: dict) -> str:
    """Peak RSS of the same recipe on 8 and 16 layers: memory must follow the largest tensor, not the model."""
    lines = [
        "| recipe | cache, math dtype | peak RSS GB, 8 layers | peak RSS GB, 16 layers | change "
        "| wall s, 8 / 16 layers |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in _recipes(results):
        for suffix, cache, dtype in VARIANTS:
            row8, row16 = results.get(f"{name}-8L{suffix}"), results.get(f"{name}-16L{suffix}")
            if not (row8 and row16 and row8["moemerge"].get("ok") and row16["moemerge"].get("ok")):
                continue
            small, large = row8["moemerge"], row16["moemerge"]
            change = (large["peak_rss_mb"] - small["peak_rss_mb"]) / small["peak_rss_mb"]
            lines.append(
                f"| {name} | {cache}, {dtype} | {_gb(small['peak_rss_mb'])} | {_gb(large['peak_rss_mb'])} "
                f"| {change:+.0%} | {small['wall_s']:.1f} / {large['wall_s']:.1f} |"
            )
    return "\n".join(lines)


def gpu_table(results: dict) -> str:
    """`--device cuda` beside the CPU run on the same GPU machine, with the largest difference in the outputs."""
    lines = [
        "| recipe | CPU wall s | CUDA wall s | CUDA / CPU | CUDA CPU-time s | max abs diff CUDA vs CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in _rows(results, 8, "-gpu"):
        cpu, cuda = row["moemerge"], row.get("moemerge-cuda", {})
        if not cuda.get("ok"):
            continue
        lines.append(
            f"| {row['recipe']} | {cpu['wall_s']:.1f} | {cuda['wall_s']:.1f} | {_ratio(cuda['wall_s'], cpu['wall_s'])} "
            f"| {cuda['cpu_s']:.1f} | {row['max_abs_diff_cuda_vs_cpu']:.2g} |"
        )
    return "\n".join(lines)


def _runs(results: dict) -> str:
    """When and how the rows were measured: machine, torch, date range and the commands."""
    rows = [row for row in results.values() if isinstance(row, dict) and row.get("layers") == 8 and "machine" in row]
    if not rows:
        return ""
    dates = sorted({row["date"] for row in rows} | {d for row in rows for d in row.get("runs", {}).values()})
    commands = sorted({row["command"] for row in rows} | {c for row in rows for c in row.get("commands", {}).values()})
    return (
        f"Machine: {rows[0]['machine']}, torch {rows[0]['torch']}; measured {dates[0]} to {dates[-1]}; commands: "
        + "; ".join(f"`{command}`" for command in commands)
        + ".\n"
    )


def report(results: dict, gpu_results: dict) -> str:
    """The whole block that goes between the README markers."""
    parts = [_runs(results)] if _runs(results) else []
    parts.append(matrix_table(results))
    sizes = size_table(results)
    if sizes.count("\n") > 1:
        parts.append("\nThe same recipes on a 16-layer set (twice the layers, same tensor sizes):\n")
        parts.append(sizes)
    gpu_rows = _rows(gpu_results, 8, "-gpu")
    if gpu_rows:
        first = gpu_rows[0]
        parts.append(
            f"\nGPU machine ({first['machine']}, torch {first['torch']}, page cache {first['moemerge']['cache']}): "
            f"`{first['command']}`\n"
        )
        parts.append(gpu_table(gpu_results))
    return "\n".join(parts)


def replace_between_markers(text: str, block: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / ".bench" / "results.json")
    parser.add_argument("--gpu", type=Path, help="results.json written by bench.py --also-device cuda on a GPU machine")
    parser.add_argument("--readme", type=Path, help="write the tables into this README between the markers")
    arguments = parser.parse_args()
    results = json.loads(arguments.results.read_text())
    gpu_results = json.loads(arguments.gpu.read_text()) if arguments.gpu else {}
    block = report(results, gpu_results)
    print(block)
    if arguments.readme:
        arguments.readme.write_text(replace_between_markers(arguments.readme.read_text(), block))


if __name__ == "__main__":
    main()
