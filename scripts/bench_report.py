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
ORDER = ("linear", "task_arithmetic", "ties", "slerp", "dare_ties", "moe")


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
    """Recipe names in the results: the original six first, then the others alphabetically."""
    names = {row["recipe"] for row in results.values() if isinstance(row, dict) and "recipe" in row}
    return [name for name in ORDER if name in names] + sorted(names - set(ORDER))


def _rows(results: dict, layers: int, label: str = "") -> list[dict]:
    rows = [results.get(f"{name}-{layers}L{label}") for name in _recipes(results)]
    return [row for row in rows if row and row.get("moemerge", {}).get("ok")]


def matrix_table(results: dict) -> str:
    """Every recipe in each cache state and math dtype measured: against mergekit and that run's I/O floor."""
    lines = [
        "| recipe | cache | math dtype | moemerge wall s | mergekit wall s | wall ratio | I/O floor s "
        "| moemerge / floor | moemerge peak RSS GB | mergekit peak RSS GB | RSS ratio | moemerge CPU s "
        "| mergekit CPU s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in _recipes(results):
        for suffix, cache, dtype in VARIANTS:
            row = results.get(f"{name}-8L{suffix}")
            if not row or not row.get("moemerge", {}).get("ok"):
                continue
            ours, theirs = row["moemerge"], row.get("mergekit", {})
            theirs = theirs if theirs.get("ok") else {}
            lines.append(
                f"| {name} | {cache} | {dtype} | {ours['wall_s']:.1f} | {_seconds(theirs)} "
                f"| {_ratio(ours['wall_s'], theirs.get('wall_s'))} | {row['io_floor_s']:.1f} "
                f"| {_ratio(ours['wall_s'], row['io_floor_s'])} | {_gb(ours['peak_rss_mb'])} "
                f"| {_gb(theirs['peak_rss_mb']) if theirs else '–'} "
                f"| {_ratio(ours['peak_rss_mb'], theirs.get('peak_rss_mb'))} | {ours['cpu_s']:.1f} "
                f"| {_cpu(theirs)} |"
            )
    return "\n".join(lines)


def comparison_table(results: dict) -> str:
    """moemerge against mergekit and the I/O floor, one line per recipe (8 layers)."""
    lines = [
        "| recipe | moemerge wall s | mergekit wall s | wall ratio | I/O floor s | moemerge / floor "
        "| moemerge peak RSS GB | mergekit peak RSS GB | RSS ratio | moemerge CPU s | read / written GB "
        "| max abs diff vs mergekit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in _rows(results, 8):
        ours, theirs = row["moemerge"], row.get("mergekit", {})
        theirs = theirs if theirs.get("ok") else {}
        diff = row.get("max_abs_diff_vs_mergekit")
        lines.append(
            f"| {row['recipe']} | {ours['wall_s']:.1f} | {_seconds(theirs)} "
            f"| {_ratio(ours['wall_s'], theirs.get('wall_s'))} | {row['io_floor_s']:.1f} "
            f"| {_ratio(ours['wall_s'], row['io_floor_s'])} | {_gb(ours['peak_rss_mb'])} "
            f"| {_gb(theirs['peak_rss_mb']) if theirs else '–'} "
            f"| {_ratio(ours['peak_rss_mb'], theirs.get('peak_rss_mb'))} | {ours['cpu_s']:.1f} "
            f"| {_gb(ours['storage_read_mb'])} / {_gb(ours['storage_write_mb'])} "
            f"| {'–' if diff is None else f'{diff:.2g}'} |"
        )
    return "\n".join(lines)


def size_table(results: dict) -> str:
    """Peak RSS of the same recipe on 8 and 16 layers: memory must follow the largest tensor, not the model."""
    lines = ["| recipe | peak RSS GB, 8 layers | peak RSS GB, 16 layers | change | wall s, 8 / 16 layers |"]
    lines.append("|---|---:|---:|---:|---:|")
    for row16 in _rows(results, 16):
        row8 = results.get(f"{row16['recipe']}-8L")
        if not row8:
            continue
        small, large = row8["moemerge"], row16["moemerge"]
        change = (large["peak_rss_mb"] - small["peak_rss_mb"]) / small["peak_rss_mb"]
        lines.append(
            f"| {row16['recipe']} | {_gb(small['peak_rss_mb'])} | {_gb(large['peak_rss_mb'])} | {change:+.0%} "
            f"| {small['wall_s']:.1f} / {large['wall_s']:.1f} |"
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


def report(results: dict, gpu_results: dict) -> str:
    """The whole block that goes between the README markers."""
    any_row = next(iter(_rows(results, 8)), None)
    parts = []
    if any_row:
        parts.append(
            f"Machine: {any_row['machine']}, torch {any_row['torch']}, {any_row['date']}; page cache "
            f"{any_row['moemerge']['cache']} before each run; command `{any_row['command']}`.\n"
        )
    parts.append(comparison_table(results))
    if any(f"{name}-8L{suffix}" in results for name in _recipes(results) for suffix, _, _ in VARIANTS[1:]):
        parts.append("\nEvery cache state and math dtype measured (warm: every input read once before the run):\n")
        parts.append(matrix_table(results))
    sizes = size_table(results)
    if sizes.count("\n") > 1:
        parts.append("\nThe same recipes on a 16-layer set (twice the model, same tensor sizes):\n")
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
