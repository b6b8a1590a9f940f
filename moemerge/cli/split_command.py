"""`moemerge-split MODEL OUT`: take experts out of an MoE as dense models, or prune it to a smaller MoE (a shell
over `moemerge.split`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from moemerge.cli.options import (
    COMMAND_SETTINGS,
    dry_run_option,
    mergekit_flags,
    quiet_option,
    trust_remote_code_option,
    user_errors,
    verbose_option,
    version_option,
    write_options,
)


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--expert", type=int, help="Dense model from expert N of every layer.")
@click.option("--all-experts", is_flag=True, help="One dense model per expert: OUT/expert-00, OUT/expert-01, ...")
@click.option("--average", is_flag=True, help="Dense model from the average of all experts' weights (baseline only).")
@click.option("--select", help="Dense model from the most used experts: top-usage, or concat:K (K per layer).")
@click.option("--prune-to", type=int, help="Stay an MoE with the K best experts per layer (needs calibration).")
@click.option("--calibration", type=click.Path(path_type=Path), help="Plain-text file run through the MoE.")
@click.option(
    "--usage",
    type=click.Path(path_type=Path),
    help="Router statistics from an earlier --report's JSON, instead of a new --calibration pass.",
)
@click.option(
    "--score",
    type=click.Choice(["reap", "frequency"]),
    default="reap",
    show_default=True,
    help="--prune-to: rank experts by REAP (routing weight x output norm) or by how often they are picked.",
)
@click.option("--report", type=click.Path(path_type=Path), help="Usage heatmap PNG (its numbers as JSON beside it).")
@click.option(
    "--seq-len", type=click.IntRange(min=1), default=256, show_default=True, help="Calibration sequence length."
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=65536,
    show_default=True,
    help="Calibration tokens read from the file at most.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Calibration sequences per batch."
)
@write_options
@trust_remote_code_option
@dry_run_option
@verbose_option
@quiet_option
@version_option
@user_errors
@mergekit_flags("lazy_unpickle", "low_cpu_memory")
def main(
    model: str,
    out: Path,
    expert: int | None,
    all_experts: bool,
    average: bool,
    select: str | None,
    prune_to: int | None,
    calibration: Path | None,
    usage: Path | None,
    score: str,
    report: Path | None,
    seq_len: int,
    max_tokens: int,
    batch_size: int,
    trust_remote_code: bool,
    dry_run: bool,
    verbose: bool,
    quiet: bool,
    **write: Any,
) -> None:
    """Take experts out of the MoE at MODEL and write them to OUT.

    With --dry-run, print the per-layer plan (per tensor with -v), after the calibration pass and its --report
    when asked.
    """
    from moemerge.api import split

    result = split(
        model,
        out,
        expert=expert,
        all_experts=all_experts,
        average=average,
        select=select,
        prune_to=prune_to,
        calibration=calibration,
        usage=usage,
        score=score,
        report=report,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
        dry_run=dry_run,
        verbose_plan=verbose,
        **write,
    )
    if dry_run or not quiet:
        click.echo(str(result))
