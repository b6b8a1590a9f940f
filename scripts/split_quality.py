"""Measure what each `moemerge-split` mode keeps: held-out perplexity of the trained toy MoE against its splits.

Runs `moemerge-split` (in process, through its click command) on the model `train_toy_moe.py` wrote, once
per mode, and scores the original and every output on the same held-out windows (stdlib files never
trained on). Prints a markdown table, writes `quality.json` beside the model and, with `--readme`, puts
the table between the `<!-- quality-table -->` markers of README.md.

    python scripts/train_toy_moe.py --minutes 6 --out .bench/toy-moe
    python scripts/split_quality.py .bench/toy-moe --readme README.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_data import heldout_perplexity  # noqa: E402

TABLE_START, TABLE_END = "<!-- quality-table -->", "<!-- /quality-table -->"
DEFAULT_MAX_TOKENS = 65536  # moemerge-split's own default, left out of the flags shown when unchanged


@dataclass
class Measurement:
    """One model's held-out score, with what it costs."""

    mode: str
    flags: str
    parameters: int
    active_parameters: int  # per token: shared weights + top-k of each MoE layer's experts
    size_mb: float
    perplexity: float
    mean_nll: float
    split_seconds: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path(".bench/toy-moe"), help="train_toy_moe.py output")
    parser.add_argument("--work", type=Path, default=None, help="where split outputs go (default MODEL-splits)")
    parser.add_argument("--concat", type=int, nargs="*", default=[2, 4], help="K values for --select concat:K")
    parser.add_argument("--prune", type=int, nargs="*", default=[6, 4, 2], help="K values for --prune-to K")
    parser.add_argument("--window", type=int, default=256, help="tokens per held-out window")
    parser.add_argument("--windows", type=int, default=128, help="held-out windows, spread evenly over the text")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="calibration tokens")
    parser.add_argument("--readme", type=Path, default=None, help="README.md to put the table into")
    return parser.parse_args(argv)


def heldout_windows(tokenizer, text: str, window: int, count: int) -> list[int]:
    """`count` windows of `window` tokens spread evenly over the tokenised `text`, joined end to end."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // window
    if available < count:
        raise SystemExit(f"held-out text has {available} windows of {window} tokens, fewer than --windows {count}")
    chosen = [round(i * available / count) for i in range(count)]
    return [token for start in chosen for token in ids[start * window : (start + 1) * window]]


def model_cost(folder: Path) -> tuple[int, int, float]:
    """(parameters, active parameters per token, size in MB) read from the safetensors headers."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    experts = config.get("num_local_experts") or 1
    active_share = (config.get("num_experts_per_tok") or 1) / experts if experts > 1 else 1.0
    parameters = active = 0
    size = 0
    for file in sorted(folder.glob("*.safetensors")):
        size += file.stat().st_size
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                count = math.prod(handle.get_slice(name).get_shape())
                parameters += count
                active += count * active_share if ".experts." in name else count
    return parameters, round(active), size / 1e6


def run_split(model: Path, out: Path, flags: list[str]) -> float:
    """`moemerge-split MODEL OUT FLAGS` in this process; seconds it took."""
    from click.testing import CliRunner

    from moemerge.cli.split_command import main

    started = time.perf_counter()
    result = CliRunner().invoke(main, [str(model), str(out), *flags, "--overwrite", "--quiet"], catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"moemerge-split {' '.join(flags)} failed:\n{result.output}")
    return time.perf_counter() - started


def measure(
    folder: Path, mode: str, flags: str, ids: list[int], args: argparse.Namespace, seconds: float = 0.0
) -> Measurement:
    """Score one model folder on the held-out windows."""
    parameters, active, size_mb = model_cost(folder)
    score = heldout_perplexity(folder, ids, window=args.window, batch_size=args.batch_size)
    measurement = Measurement(mode, flags, parameters, active, size_mb, score.perplexity, score.mean_nll, seconds)
    print(f"{mode:28s} ppl {score.perplexity:9.2f}  ({parameters:,} params, split {seconds:.1f} s)", flush=True)
    return measurement


def run_all(args: argparse.Namespace) -> dict:
    """Every mode on the model; the measurements and the settings that produced them."""
    from transformers import AutoTokenizer

    model = args.model.resolve()
    work = (args.work or model.parent / f"{model.name}-splits").resolve()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = heldout_windows(tokenizer, (model / "heldout.txt").read_text(encoding="utf-8"), args.window, args.windows)
    calibration = ["--calibration", str(model / "calibration.txt")]
    if args.max_tokens != DEFAULT_MAX_TOKENS:
        calibration += ["--max-tokens", str(args.max_tokens)]
    experts = json.loads((model / "config.json").read_text())["num_local_experts"]

    results = [measure(model, "original MoE", "", ids, args)]
    seconds = run_split(model, work / "experts", ["--all-experts"])
    for expert in range(experts):
        folder = work / "experts" / f"expert-{expert:02d}"
        results.append(measure(folder, f"expert {expert}", f"--expert {expert}", ids, args, seconds / experts))
    runs = [("average", ["--average"]), ("top-usage", [*calibration, "--select", "top-usage"])]
    runs += [(f"concat:{k}", [*calibration, "--select", f"concat:{k}"]) for k in args.concat]
    runs += [
        (f"prune-to {k} ({score})", [*calibration, "--prune-to", str(k), "--score", score])
        for k in args.prune
        for score in ("reap", "frequency")
    ]
    for mode, flags in runs:
        out = work / mode.replace(" ", "-").replace(":", "-").replace("(", "").replace(")", "")
        seconds = run_split(model, out, flags)
        shown = " ".join(flag if not flag.endswith("calibration.txt") else "calibration.txt" for flag in flags)
        results.append(measure(out, mode, shown, ids, args, seconds))
    return {
        "model": str(model),
        "heldout_windows": args.windows,
        "window": args.window,
        "heldout_tokens_predicted": args.windows * (args.window - 1),
        "calibration_max_tokens": args.max_tokens,
        "training": json.loads((model / "training.json").read_text()),
        "results": [asdict(result) for result in results],
    }


def markdown_table(report: dict) -> str:
    """The results as a markdown table; the naive experts folded into best / mean / worst rows."""
    results = [Measurement(**row) for row in report["results"]]
    original = results[0]
    experts = [r for r in results if r.mode.startswith("expert ")]
    rows = [original]
    if experts:
        by_ppl = sorted(experts, key=lambda r: r.perplexity)
        best, worst = by_ppl[0], by_ppl[-1]
        mean_ppl = statistics.fmean(r.perplexity for r in experts)  # of the perplexities, not of the losses
        rows.append(replace(best, mode=f"expert N, best (N={best.flags.split()[-1]})"))
        rows.append(replace(best, mode=f"expert N, mean of {len(experts)}", flags="--all-experts", perplexity=mean_ppl))
        rows.append(replace(worst, mode=f"expert N, worst (N={worst.flags.split()[-1]})"))
    rows += [r for r in results[1:] if not r.mode.startswith("expert ")]
    lines = [
        "| mode | flags | params | active / token | size | held-out ppl | × original |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        flags = f"`{row.flags}`" if row.flags else ""
        lines.append(
            f"| {row.mode} | {flags} | {row.parameters / 1e6:.2f} M | {row.active_parameters / 1e6:.2f} M "
            f"| {row.size_mb:.1f} MB | {row.perplexity:.2f} | {row.perplexity / original.perplexity:.2f} |"
        )
    return "\n".join(lines)


def put_between_markers(text: str, block: str) -> str:
    """`text` with everything between TABLE_START and TABLE_END replaced by `block`."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise SystemExit(f"README needs the markers {TABLE_START} ... {TABLE_END} (in that order)")
    return text[: start + len(TABLE_START)] + "\n" + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    report = run_all(args)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (args.model / "quality.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(report)
    print(table)
    if args.readme is not None:
        args.readme.write_text(put_between_markers(args.readme.read_text(encoding="utf-8"), table), encoding="utf-8")
    print(f"wrote {args.model / 'quality.json'} in {report['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
