"""`moemerge-lora extract FINETUNE BASE OUT`: a PEFT LoRA adapter of a fine-tune's difference from its base."""

from __future__ import annotations

from pathlib import Path

import click

from moemerge.cli.options import (
    COMMAND_SETTINGS,
    device_option,
    mergekit_flags,
    overwrite_option,
    quiet_option,
    resolve_device,
    user_errors,
    verbose_option,
    version_option,
)


@click.group(context_settings=COMMAND_SETTINGS)
@version_option
def main() -> None:
    """LoRA adapters: extract one from a fine-tune (`base+adapter` references read them into merges)."""


@main.command(context_settings=COMMAND_SETTINGS)
@click.argument("finetune")
@click.argument("base")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--rank", "--max-rank", "rank", type=click.IntRange(min=1), help="Rank per tensor (default 32; cap with --energy)."
)
@click.option(
    "--energy",
    type=click.FloatRange(0, 1, min_open=True),
    help="Per tensor, the fewest singular values keeping this share of ‖ΔW‖² (e.g. 0.99).",
)
@click.option("--sv-epsilon", type=float, default=0.0, show_default=True, help="Drop singular values at or below this.")
@click.option("--save-embeddings", is_flag=True, help="Save embed_tokens / lm_head deltas whole (modules_to_save).")
@click.option("--embed-lora", is_flag=True, help="Decompose embed_tokens / lm_head too, instead of leaving them out.")
@click.option("--save-module", "save_modules", multiple=True, help="A module name to save whole (repeatable).")
@click.option("-i", "--include-regex", "include", multiple=True, help="Decompose only modules matching (repeatable).")
@click.option("-e", "--exclude-regex", "exclude", multiple=True, help="Do not decompose modules matching (repeatable).")
@click.option("--skip-undecomposable", is_flag=True, help="Leave changed norms out instead of saving them whole.")
@click.option(
    "--out-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Adapter dtype (default: fine-tune)."
)
@device_option
@overwrite_option
@verbose_option
@quiet_option
@version_option
@user_errors
@mergekit_flags(
    "lazy_unpickle",
    "clone_tensors",
    "lora_merge_cache",
    low_cpu_memory="the weights are read one tensor pair at a time",
    copy_tokenizer="an adapter folder holds no tokenizer",
    allow_crimes="the fine-tune and its base must share every tensor shape",
)
def extract(
    finetune: str,
    base: str,
    out: Path,
    rank: int | None,
    energy: float | None,
    sv_epsilon: float,
    save_embeddings: bool,
    embed_lora: bool,
    save_modules: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    skip_undecomposable: bool,
    out_dtype: str | None,
    device: str,
    overwrite: bool,
    verbose: bool,
    quiet: bool,
) -> None:
    """Write the difference FINETUNE − BASE as a PEFT LoRA adapter in OUT (truncated SVD per tensor)."""
    import torch

    from moemerge.lora.extract import ExtractOptions, extract_lora

    options = ExtractOptions(
        rank=rank if rank is not None or energy is not None else 32,
        energy=energy,
        sv_epsilon=sv_epsilon,
        save_embeddings=save_embeddings,
        embed_lora=embed_lora,
        save_modules=save_modules,
        include=include,
        exclude=exclude,
        skip_undecomposable=skip_undecomposable,
        out_dtype=getattr(torch, out_dtype) if out_dtype else None,
        device=resolve_device(device),
        overwrite=overwrite,
        progress=not quiet,
    )
    report = extract_lora(finetune, base, out, options)
    if not quiet:
        ranks = sorted(report.ranks.values()) or [0]
        click.echo(
            f"wrote {out}: {len(report.ranks)} modules at rank {ranks[0]}–{ranks[-1]}, "
            f"{len(report.modules_to_save)} saved whole, {report.adapter_bytes / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
