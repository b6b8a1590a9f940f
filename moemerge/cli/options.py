"""Click options and error handling shared by the moemerge commands (each command picks what it uses)."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click
import torch

from moemerge.errors import MoemergeError
from moemerge.io.output_dir import Interrupts
from moemerge.io.writer import parse_size

log = logging.getLogger("moemerge")


def resolve_device(choice: str) -> str:
    """'auto' → cuda when available; asking for cuda without it is a user error, not a silent fallback."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise MoemergeError("--device cuda was given but no CUDA device is available (use --device cpu or auto)")
    return choice


def _size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


device_option = click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default="cpu",
    show_default=True,
    help="Where the tensor math runs.",
)
seed_option = click.option(
    "--random-seed", type=int, default=0, show_default=True, help="Seed for random masks/routers."
)
shard_size_option = click.option(
    "--out-shard-size", default="5G", show_default=True, callback=_size, help="Largest output shard, e.g. 500M, 5G."
)


def _memory(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None or value.strip().lower() == "auto":
        return None  # the executor picks a quarter of RAM, between 1 GB and 16 GB
    return _size(_ctx, _param, value)


max_memory_option = click.option(
    "--max-memory",
    default="auto",
    show_default=True,
    callback=_memory,
    help="Memory budget for tensors in flight, e.g. 2G; auto = a quarter of RAM (1G to 16G).",
)
workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Tensors computed at once (default: one per core); the output is the same for any value.",
)


executor_option = click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: write the output shards as Ray tasks (pip install 'moemerge[ray]').",
)
ray_address_option = click.option(
    "--ray-address", default=None, help="With --executor ray: join this Ray cluster (default: start a local Ray)."
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
copy_tokenizer_option = click.option(
    "--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True, help="Copy tokenizer files."
)
trust_remote_code_option = click.option(
    "--trust-remote-code", is_flag=True, help="Allow running model code shipped with a checkpoint (off by default)."
)
allow_nonfinite_option = click.option(
    "--allow-nonfinite", is_flag=True, help="Write NaN/Inf (or float16 overflow) with a warning instead of failing."
)
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the plan and exit without reading tensors.")
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
quiet_option = click.option("--quiet", is_flag=True, help="Only warnings and errors; no progress bar.")


def configure_logging(verbose: bool, quiet: bool) -> None:
    """moemerge's own messages go to stderr as `LEVEL: message`; other libraries stay quiet unless --verbose."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    for old in [handler for handler in log.handlers if getattr(handler, "moemerge", False)]:
        log.removeHandler(old)  # a fresh handler per run binds to the current sys.stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.moemerge = True
    log.addHandler(handler)
    log.setLevel(level)
    for library in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(library).setLevel(logging.INFO if verbose else logging.ERROR)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MoemergeError into one 'error: ...' line and exit 1; tracebacks only with --verbose."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = bool(kwargs.get("verbose"))
        configure_logging(verbose, bool(kwargs.get("quiet")))
        try:
            with Interrupts():  # SIGTERM and SIGHUP stop a run as Ctrl-C does
                return command(*args, **kwargs)
        except MoemergeError as error:
            if verbose:
                traceback.print_exc()
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)

    return wrapper
