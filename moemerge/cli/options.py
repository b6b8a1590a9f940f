"""Click options and error handling shared by the moemerge commands (each command picks what it uses).

Nothing here imports torch: `--help`, `--version` and recipe errors answer before the tensor stack loads.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from moemerge import __version__
from moemerge.api import resolve_device  # noqa: F401  (commands import it from here; torch loads on call)
from moemerge.errors import MoemergeError
from moemerge.io.output_dir import Interrupts
from moemerge.sizes import parse_memory, parse_shard_size

log = logging.getLogger("moemerge")

COMMAND_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _shard_size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        return parse_shard_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error).removeprefix("--out-shard-size: ")) from None


def memory_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """Memory budgets (--max-memory, evolve's --task-memory): a unit is required; `auto` or unset is None."""
    try:
        return parse_memory(value)
    except ValueError as error:
        raise click.BadParameter(str(error).split(": ", 1)[-1]) from None


version_option = click.version_option(__version__, "--version", prog_name="moemerge", message="%(prog)s %(version)s")
device_option = click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default="cpu",
    show_default=True,
    help="Where the tensor math runs; auto = cuda when available.",
)
seed_option = click.option(
    "--random-seed", type=int, default=0, show_default=True, help="Seed for random masks (DARE) and random routers."
)
shard_size_option = click.option(
    "--out-shard-size",
    default="5B",
    show_default=True,
    callback=_shard_size,
    help="Largest output shard in bytes: 5B = five billion as in mergekit; also 500M, 5GB, 2GiB.",
)
max_memory_option = click.option(
    "--max-memory",
    default="auto",
    show_default=True,
    callback=memory_size,
    help="Memory budget for tensors in flight, with a unit (2G, 512M); auto = a quarter of RAM (1G to 16G).",
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
    help="ray: write the output shards as Ray tasks (needs Ray: pip install ray, or pip install -e '.[ray]').",
)
ray_address_option = click.option(
    "--ray-address", default=None, help="With --executor ray: join this Ray cluster (default: start a local Ray)."
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
copy_tokenizer_option = click.option(
    "--copy-tokenizer/--no-copy-tokenizer",
    default=True,
    show_default=True,
    help="Copy the tokenizer files into the output.",
)
allow_crimes_option = click.option(
    "--allow-crimes/--no-allow-crimes",
    default=False,
    help="Merge models of different architectures, and skip inputs whose tensor shapes do not match.",
)
trust_remote_code_option = click.option(
    "--trust-remote-code", is_flag=True, help="Allow running model code shipped with a checkpoint (off by default)."
)
allow_nonfinite_option = click.option(
    "--allow-nonfinite", is_flag=True, help="Write NaN/Inf (or float16 overflow) with a warning instead of failing."
)
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Print the plan (per layer; per tensor with -v) and exit without writing."
)
verbose_option = click.option(
    "-v", "--verbose", is_flag=True, help="Show the plan and timings; debug logging; tracebacks on errors."
)
quiet_option = click.option("--quiet", is_flag=True, help="Only warnings and errors; no progress bar or summary.")


def write_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command that writes a model folder takes: `--device`, `--out-shard-size`, `--max-memory`,
    `--workers`, `--overwrite`, `--allow-nonfinite`; the command receives them as the API's WriteOptions fields."""
    for option in reversed(
        (device_option, shard_size_option, max_memory_option, workers_option, overwrite_option, allow_nonfinite_option)
    ):
        command = option(command)
    return command


# mergekit options that change nothing here, with why; accepted so that mergekit command lines run unchanged.
MERGEKIT_NOOPS: dict[str, tuple[str, str]] = {
    "lazy_unpickle": ("--lazy-unpickle", "moemerge always reads tensors lazily"),
    "low_cpu_memory": ("--low-cpu-memory", "memory is bounded by --max-memory"),
    "clone_tensors": ("--clone-tensors", "every output tensor is written from its own buffer"),
    "lora_merge_cache": ("--lora-merge-cache", "nothing is cached between runs"),
    "understand_untrained": (
        "--i-understand-this-is-not-useful-without-training",
        "moemerge-moe never asks for this confirmation",
    ),
    "copy_tokenizer": ("--copy-tokenizer", "nothing here has a tokenizer to copy"),
    "allow_crimes": ("--allow-crimes", "nothing here mixes architectures"),
}


def mergekit_flags(*names: str, **reasons: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Accept mergekit's `--cuda` (= --device cuda) and the harmless flags in `names` (or in `reasons`, with the
    command's own reason), each as `--flag/--no-flag` like mergekit's, noting the ones given that do nothing.

    The flags are consumed here, so the command's function sees only `device` changed by `--cuda`.
    """
    noops = {name: MERGEKIT_NOOPS[name] for name in names}
    noops |= {name: (MERGEKIT_NOOPS[name][0], why) for name, why in reasons.items()}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if kwargs.pop("cuda", False):
                kwargs["device"] = "cuda"
            for name, (flag, why) in noops.items():
                if kwargs.pop(name, None):
                    log.info("%s is accepted for mergekit compatibility and has no effect: %s", flag, why)
            return command(*args, **kwargs)

        for name, (flag, why) in reversed(noops.items()):
            if name == "lora_merge_cache":
                option = click.option(flag, name, metavar="PATH", default=None, help=f"mergekit's; no effect ({why}).")
            elif name == "understand_untrained":  # a plain flag in mergekit too
                option = click.option(flag, name, is_flag=True, help=f"mergekit's; no effect ({why}).")
            else:
                negative = flag.replace("--", "--no-", 1)
                option = click.option(f"{flag}/{negative}", name, default=False, help=f"mergekit's; no effect ({why}).")
            wrapper = option(wrapper)
        return click.option("--cuda/--no-cuda", default=False, help="mergekit's spelling of --device cuda.")(wrapper)

    return decorate


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
