"""Where a merge's CPU time goes, per recipe of `scripts/bench.py` (issue 15's "how it gets there" table).

    python scripts/profile_breakdown.py --math-dtype bfloat16            # every recipe; --only NAME... for some

Runs each recipe once with a warm page cache under `perf record` (sampling every thread, user and kernel) and
sorts the samples into what they are spent on: page faults that zero fresh memory, copies from the page cache
(preadv) and into it (pwrite), dtype conversions, selection (top-k thresholds), random draws, matrix products,
the remaining tensor arithmetic, and the Python interpreter with its garbage collector. Prints a markdown table
of percentages of the run's CPU time, one row per recipe, with that CPU time and the minor page faults (from GNU
time); rows are kept in `.bench/profile.json`, so recipes can be profiled in several runs. Needs `perf`
with access to kernel samples (perf_event_paranoid ≤ 1, or root) and the benchmark set from `bench.py`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import BENCH, read_inputs, recipe_inputs, recipes, tool_command  # noqa: E402

# (category, pattern on perf's symbol column); the first that matches wins
CATEGORIES = [
    (
        "page faults (zeroing fresh memory)",
        r"clear_page|folio_zero|page_fault|handle_mm_fault|anonymous_page|huge_pmd"
        r"|alloc_.*pages|get_page_from_freelist|free_unref|unmap_page_range|memcg|__list_del_entry|free_tail_page"
        r"|rmqueue|zap_|release_pages|lru",
    ),
    ("read: copy from the page cache", r"_copy_to_iter|copy_page_to_iter|filemap_|xas_|folio_mark_accessed|preadv"),
    (
        "write: copy into the page cache, writeback",
        r"copy_folio_from_iter|ext4_|mpage_|generic_perform_write|pwrite"
        r"|writeback|block_write|__filemap_add_folio|bio",
    ),
    ("dtype conversions", r"copy_kernel|reduced_float_copy|convert"),
    (
        "selection and sorting",
        r"partition_unrolled|QSelect|introsort|kthvalue|qsort|argsort|sort_|radix|nonzero",
    ),
    ("random draws", r"GeneratorImpl|mt19937|uniform|bernoulli|normal_kernel|cpu_serial_kernel"),
    ("matrix products", r"gemm|mkl_blas|dot_|blas"),
    (
        "Python interpreter and GC",
        r"_Py|Py[A-Z]|gc_collect|visit_|unicodekeys|dict_|tuple_|func_traverse|subtype_"
        r"|meth_traverse|list_traverse|_PyEval|pymalloc|slot_",
    ),
    ("tensor arithmetic (add, mul, compare, sums)", r"at::native|c10::function_ref|vectorized|Vectorized|at::vec"),
    ("torch dispatch and other library code", r"c10::|at::|torch::|libtorch"),
]


def categorize(report: str) -> dict[str, float]:
    shares: dict[str, float] = {}
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(.*)", line)
        if not match:
            continue
        percent, space, symbol = float(match[1]), match[2], match[3]
        category = next((name for name, pattern in CATEGORIES if re.search(pattern, symbol)), None)
        if category is None:
            category = "other kernel work (syscalls, scheduling)" if space == "k" else "other user code (libc, malloc)"
        shares[category] = shares.get(category, 0.0) + percent
    return shares


def profile(name: str, kind: str, text: str, extra: list[str]) -> dict:
    config = BENCH / "recipes" / f"{name}-profile.yml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    out = BENCH / "out" / f"profile-{name}"
    data, times = BENCH / "logs" / f"profile-{name}.perf", BENCH / "logs" / f"profile-{name}.time"
    data.parent.mkdir(parents=True, exist_ok=True)
    read_inputs(recipe_inputs(text))
    command = tool_command("moemerge", kind, config, out, None, extra)
    record = ["perf", "record", "-F", "499", "-o", str(data), "--", "/usr/bin/time", "-f", "%U %S %R", "-o", str(times)]
    subprocess.run([*record, *command], check=True, capture_output=True)
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "sym", "--stdio", "-g", "none"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    user, system, faults = times.read_text().split()[-3:]
    subprocess.run(["rm", "-rf", str(out), str(data)], check=False)
    return {"cpu_s": float(user) + float(system), "minor_faults": int(faults), "shares": categorize(report)}


SHORT = {  # column titles of the table, one row per recipe
    "page faults (zeroing fresh memory)": "page faults",
    "read: copy from the page cache": "read",
    "write: copy into the page cache, writeback": "write",
    "dtype conversions": "dtype casts",
    "selection and sorting": "selection, sorting",
    "random draws": "random draws",
    "matrix products": "matmul",
    "Python interpreter and GC": "Python",
    "tensor arithmetic (add, mul, compare, sums)": "tensor arithmetic",
    "torch dispatch and other library code": "torch dispatch",
    "other kernel work (syscalls, scheduling)": "other kernel",
    "other user code (libc, malloc)": "other user",
}


def table(rows: dict[str, dict]) -> str:
    """One row per recipe: CPU s, minor faults, then each category's share of the CPU time."""
    lines = [
        "| recipe | CPU s | minor faults | " + " | ".join(SHORT.values()) + " |",
        "|---|---:|---:|" + "---:|" * len(SHORT),
    ]
    for name, row in rows.items():
        shares = " | ".join(f"{row['shares'].get(column, 0.0):.0f}%" for column in SHORT)
        lines.append(f"| {name} | {row['cpu_s']:.1f} | {row['minor_faults'] // 1000}k | {shares} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="recipes to profile (default: every recipe of bench.py)")
    parser.add_argument("--math-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--extra", default="", help="extra moemerge options")
    parser.add_argument(
        "--results",
        type=Path,
        default=BENCH / "profile.json",
        help="rows are kept here by recipe and math dtype; the table printed holds every kept row of that dtype",
    )
    arguments = parser.parse_args()
    every = recipes(BENCH / f"models-{arguments.layers}L", arguments.math_dtype)
    kept = json.loads(arguments.results.read_text()) if arguments.results.exists() else {}
    for name in arguments.only or list(every):
        kept[f"{name}:{arguments.math_dtype}"] = profile(name, *every[name], arguments.extra.split())
        arguments.results.write_text(json.dumps(kept, indent=1))
    rows = {name: kept[f"{name}:{arguments.math_dtype}"] for name in every if f"{name}:{arguments.math_dtype}" in kept}
    print(table(rows))


if __name__ == "__main__":
    main()
