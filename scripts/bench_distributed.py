"""Measure `--executor ray` against the local executor, and moemerge-evolve's candidates per minute.

    python scripts/bench_distributed.py                    # 0.5 B set from bench.py (generated once in .bench/)
    python scripts/bench_distributed.py --readme README.md # also write the table between the ray-table markers

Each merge runs in its own process (wall, CPU and peak RSS as in bench.py), page cache warm (one unmeasured
run first). The Ray rows start a local Ray of 2 CPUs inside the command, as a user's first run would; Ray's
start-up alone is measured separately so the driver's fixed cost can be read off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BENCH, FINE_TUNES, measure, model_set  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

OBJECTIVE = '''
def tensor_norm(state_dict, config, recipe):
    """A cheap objective: the search's cost is then the in-memory merge itself."""
    return float(state_dict["model.layers.0.mlp.down_proj.weight"].float().norm())
'''


def entry_point(module: str) -> list[str]:
    """A moemerge command run by this interpreter (no console script needed)."""
    return [sys.executable, "-c", f"from moemerge.cli.{module} import main; main()"]


def merge_rows(models: Path, work: Path) -> list[dict]:
    fine_tunes = [models / name for name in FINE_TUNES]
    listing = "".join(f"  - model: {path}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for path in fine_tunes)
    recipes = {
        "linear": f"merge_method: linear\nmodels:\n{listing.replace(', density: 0.5', '')}dtype: float32\n",
        "ties": f"merge_method: ties\nbase_model: {models / 'base'}\nmodels:\n{listing}dtype: float32\n",
    }
    rows = []
    for name, text in recipes.items():
        recipe = work / f"{name}.yml"
        recipe.write_text(text)
        for executor in ("local", "ray"):
            out = work / f"out-{name}-{executor}"
            command = [
                *entry_point("yaml_command"),
                str(recipe),
                str(out),
                "--quiet",
                "--overwrite",
                "--executor",
                executor,
                "--workers",
                "2",
                "--out-shard-size",
                "500M",
            ]
            measure(command)  # warm the page cache
            result = measure(command)
            rows.append({"recipe": name, "executor": executor, **result})
            print(json.dumps(rows[-1]), flush=True)
    for name in recipes:
        local, ray = (work / f"out-{name}-{executor}" for executor in ("local", "ray"))
        same = all((local / file.name).read_bytes() == file.read_bytes() for file in ray.glob("*.safetensors"))
        rows.append({"recipe": name, "byte_identical": same})
    return rows


def ray_start_seconds() -> float:
    code = (
        "import ray, time; started = time.perf_counter(); ray.init(num_cpus=2, include_dashboard=False); "
        "print(time.perf_counter() - started)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()[-1])


def evolve_rows(models: Path, work: Path, generations: int) -> list[dict]:
    (work / "objective.py").write_text(OBJECTIVE)
    template = (
        "template:\n  merge_method: linear\n  models:\n"
        + "".join(
            f"    - model: {models / name}\n      parameters: {{weight: {{min: 0, max: 1}}}}\n" for name in FINE_TUNES
        )
        + "  dtype: float32\nobjective:\n  callable: objective.py:tensor_norm\n"
    )
    (work / "evolve.yml").write_text(template)
    rows = []
    for concurrent in (1, 2):
        out = work / f"search-{concurrent}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run(
            [
                *entry_point("evolve_command"),
                str(work / "evolve.yml"),
                str(out),
                "--population",
                "4",
                "--generations",
                str(generations),
                "--max-concurrent",
                str(concurrent),
                "--quiet",
            ],
            check=True,
        )
        wall = time.perf_counter() - started
        entries = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        per_candidate = sorted(entry["seconds"] for entry in entries)
        rows.append(
            {
                "evolve_concurrent": concurrent,
                "candidates": len(entries),
                "wall_s": round(wall, 1),
                "candidates_per_min": round(len(entries) / wall * 60, 1),
                "median_candidate_s": round(per_candidate[len(per_candidate) // 2], 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(results: dict) -> str:
    merges = [row for row in results["rows"] if "executor" in row]
    identical = {row["recipe"]: row["byte_identical"] for row in results["rows"] if "byte_identical" in row}
    lines = [
        f"Machine: {results['machine']}; 0.5 B set of `scripts/bench.py`, page cache warm, `--workers 2`; local Ray "
        f"of 2 CPUs started inside each Ray command (Ray's start alone: {results['ray_start_s']:.1f} s).",
        "",
        "| recipe | executor | wall s | CPU s | peak RSS GB (driver) | output byte-identical to local |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in merges:
        same = "yes" if identical.get(row["recipe"]) else "NO"
        lines.append(
            f"| {row['recipe']} | {row['executor']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
            f"{row['peak_rss_mb'] / 1000:.2f} | {same if row['executor'] == 'ray' else '–'} |"
        )
    lines += [
        "",
        "| moemerge-evolve (linear of 3 × 0.5 B, population 4) | candidates | wall s | candidates / min | "
        "median s per candidate |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        if "evolve_concurrent" in row:
            lines.append(
                f"| `--max-concurrent {row['evolve_concurrent']}` | {row['candidates']} | {row['wall_s']} | "
                f"{row['candidates_per_min']} | {row['median_candidate_s']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--readme", type=Path)
    args = parser.parse_args()
    import platform

    import torch

    models = model_set(args.layers, ("base", *FINE_TUNES))
    work = BENCH / "distributed"
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "ray_start_s": ray_start_seconds(),
        "rows": merge_rows(models, work) + evolve_rows(models, work, args.generations),
    }
    (BENCH / "distributed.json").write_text(json.dumps(results, indent=2))
    rendered = table(results)
    print(rendered)
    if args.readme:
        text = args.readme.read_text()
        start, end = "<!-- ray-table -->", "<!-- /ray-table -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        args.readme.write_text(f"{head}{start}\n{rendered}\n{end}{tail}")


if __name__ == "__main__":
    main()
