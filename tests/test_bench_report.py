"""The benchmark report (scripts/bench_report.py): ratios from the recorded figures, README markers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_report import END, START, replace_between_markers, report  # noqa: E402


def figures(wall: float, rss_mb: float, ok: bool = True) -> dict:
    return {"ok": ok, "wall_s": wall, "cpu_s": wall, "peak_rss_mb": rss_mb, "storage_read_mb": 3000,
            "storage_write_mb": 1000, "cache": "cold"}  # fmt: skip


def row(recipe: str, layers: int, ours: dict, **extra) -> dict:
    info = {"recipe": recipe, "layers": layers, "machine": "m", "torch": "t", "date": "d", "command": "c"}
    return {**info, "moemerge": ours, "io_floor_s": 5.0, **extra}


def test_ratios_targets_and_the_size_check_come_from_the_recorded_figures() -> None:
    results = {
        "linear-8L-warm": row("linear", 8, figures(10.0, 800), mergekit=figures(25.0, 2000)),
        "ties-8L-warm": row("ties", 8, figures(50.0, 2500), mergekit=figures(500.0, 3000, ok=False)),
        "dare_ties-8L-warm": row("dare_ties", 8, figures(30.0, 1600), mergekit=figures(100.0, 3000)),
        "moe-8L-warm": row("moe", 8, figures(6.0, 400), mergekit=figures(10.0, 2000)),
        "linear-16L-warm": row("linear", 16, figures(21.0, 840)),
    }
    lines = report(results, {}).splitlines()
    linear = next(line for line in lines if line.startswith("| linear | warm | float32 | 10.0"))
    # wall 10 / 25 = 0.40, 10 s against a 5 s floor = 2.00 (the ≤ 2× floor target, met), RSS 0.8 / 2.0 GB = 0.40
    assert "| 25.0 | 0.40 | 5.0 | 2.00 | 0.80 / 2.00 | 0.40 | 10.0 / 25.0 | ≤ 2× floor | yes |" in linear
    ties = next(line for line in lines if line.startswith("| ties |"))
    assert "| – | – | 5.0 | 10.00 |" in ties and ties.endswith("| ≤ 0.2× mergekit | – |")  # mergekit failed
    dare = next(line for line in lines if line.startswith("| dare_ties |"))
    assert dare.endswith("| ≤ 0.2× mergekit | no: wall 0.30× mergekit, RSS 0.53× |")  # 30 / 100 s, 1.6 / 3.0 GB
    moe = next(line for line in lines if line.startswith("| moe |"))
    assert moe.endswith("| ≤ 2× floor, ≤ 0.5× mergekit | no: wall 0.60× mergekit |")  # 1.2× its 5 s floor: met
    assert "| linear | warm, float32 | 0.80 | 0.84 | +5% | 10.0 / 21.0 |" in lines


def test_cold_rows_carry_only_the_memory_target() -> None:
    results = {"ties-8L": row("ties", 8, figures(50.0, 2500), mergekit=figures(100.0, 3000))}
    ties = next(line for line in report(results, {}).splitlines() if line.startswith("| ties | cold"))
    assert ties.endswith("| – | no: RSS 0.83× |")


def test_the_readme_block_between_the_markers_is_replaced_and_the_rest_kept() -> None:
    text = f"intro\n{START}\nold table\n{END}\noutro\n"
    assert replace_between_markers(text, "new") == f"intro\n{START}\nnew\n{END}\noutro\n"
    with pytest.raises(SystemExit, match="markers"):
        replace_between_markers("no markers", "new")


def test_warm_and_bfloat16_rows_form_the_matrix_table() -> None:
    results = {
        "ties-8L": row("ties", 8, figures(40.0, 1500), mergekit=figures(160.0, 4500)),
        "ties-8L-bf16-warm": row("ties", 8, figures(30.0, 1200), mergekit=figures(150.0, 4000)),
        "della-8L-warm": row("della", 8, figures(20.0, 1000)),
    }
    lines = report(results, {}).splitlines()
    assert (
        "| ties | warm | bfloat16 | 30.0 | 150.0 | 0.20 | 5.0 | 6.00 | 1.20 / 4.00 | 0.30 | 30.0 / 150.0 "
        "| ≤ 0.2× mergekit | yes |" in lines
    )
    assert (
        "| ties | cold | float32 | 40.0 | 160.0 | 0.25 | 5.0 | 8.00 | 1.50 / 4.50 | 0.33 | 40.0 / 160.0 | – | yes |"
        in lines
    )
    assert any(line.startswith("| della | warm | float32 | 20.0 | – |") for line in lines)  # no mergekit run
