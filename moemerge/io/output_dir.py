"""Build an output folder beside its target and move it into place only when it is complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moemerge.errors import OutputError

PARTIAL_MARKER = ".moemerge-partial-"


def check_target(target: Path, overwrite: bool) -> Path:
    """Refuse a target that is a file, or a non-empty folder without --overwrite; before any work starts."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"output folder {target} is not empty; pass --overwrite to replace it")
    return target


@contextmanager
def staged_output(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `target`; on success it replaces `target`, on error it is deleted."""
    target = check_target(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL_MARKER}", dir=target.parent))
    except OSError as error:
        raise OutputError(f"cannot create output beside {target}: {error.strerror or error}") from None
    try:
        yield staging
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path) -> None:
    if target.is_dir() and any(target.iterdir()):
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.moemerge-old-", dir=target.parent))
        os.rename(target, retired / target.name)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        if target.is_dir():
            target.rmdir()
        os.rename(staging, target)
