"""Put an output folder in place so that no kill, race or mistake loses data.

The folder is built beside its target under a recognisable name (`.OUT.moemerge-partial-PID-XXXX`) and moved
into place only when complete. While a run builds it, a lock file beside the target (`.OUT.moemerge-lock`,
flock) keeps other runs out. Just before the move the target is checked again, and the move itself is one
atomic step: a plain rename onto an absent or empty target, or `renameat2(RENAME_EXCHANGE)` onto a folder
being overwritten, so the path holds the complete old folder or the complete new one at every instant.
Where the kernel or file system cannot exchange, a journaled two-step rename is used and the next run (or
the next `check_target`) finishes or undoes it. Staging folders of runs that were killed are removed by the
next run into the same target. SIGTERM and SIGHUP stop a run as Ctrl-C does; a signal that arrives while the
output is being moved is held until the move is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moemerge.errors import OutputError

PARTIAL_MARKER = ".moemerge-partial-"
RETIRED_MARKER = ".moemerge-old-"
LOCK_SUFFIX = ".moemerge-lock"
JOURNAL_SUFFIX = ".moemerge-journal"
KILL_POINT_ENV = "MOEMERGE_TEST_KILL_AT"  # tests: SIGKILL this process at the named step of placement
NO_EXCHANGE_ENV = "MOEMERGE_TEST_NO_EXCHANGE"  # tests: take the journaled two-step path
RENAME_EXCHANGE = 2
log = logging.getLogger(__name__)
AT_FDCWD = -100

# What this process reads: the output may not be put over them. Models are held weakly (a finished run's
# models drop out); recipe files are remembered by path.
_input_models: weakref.WeakSet[Any] = weakref.WeakSet()
_recipe_files: set[Path] = set()


def protect_model(model: Any) -> None:
    """Refuse to overwrite a folder that holds this model (anything with a `.folder`) while it is alive."""
    _input_models.add(model)


def protect_recipe(path: Path | str) -> None:
    """Refuse to overwrite a folder that holds this recipe file."""
    with contextlib.suppress(OSError):
        if Path(path).is_file():
            _recipe_files.add(Path(path).resolve())


def _protected() -> list[tuple[str, Path]]:
    paths = [("the current directory", Path.cwd().resolve())]
    paths += [(f"recipe {path}", path) for path in _recipe_files]
    for model in list(_input_models):
        folder = Path(model.folder)
        paths.append((f"input model {getattr(model, 'label', folder)}", folder.resolve()))
        paths.append((f"input model {getattr(model, 'label', folder)}", folder.absolute()))
    return paths


def _names(target: Path) -> tuple[Path, Path]:
    return target.parent / f".{target.name}{LOCK_SUFFIX}", target.parent / f".{target.name}{JOURNAL_SUFFIX}"


def _kill_point(step: str) -> None:
    """Die here, as a SIGKILL would, when a test asks for it: makes every step of placement testable."""
    if os.environ.get(KILL_POINT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# --- checks -------------------------------------------------------------------------------------------------------


def _check_state(target: Path, overwrite: bool) -> None:
    """The target may be absent, an empty folder, or (with --overwrite) a folder that holds none of our inputs."""
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} exists and is not a folder")
    if not target.is_dir():
        return
    if not overwrite and any(target.iterdir()):
        raise OutputError(f"output folder {target} is not empty; pass --overwrite to replace it")
    real = target.resolve()
    for what, path in _protected():
        if path == real or path == target or real in path.parents or target in path.parents:
            raise OutputError(f"refusing to replace {target}: it holds {what}")


def check_target(target: Path, overwrite: bool) -> Path:
    """Refuse a target that is a file, a non-empty folder without --overwrite, a folder holding an input, or one
    another run is writing; before any work starts. Finishes a placement an earlier run left half done."""
    target = Path(target).expanduser().absolute()
    if target.parent.is_dir():
        with _locked(target):
            _recover(target)
            _check_state(target, overwrite)
    else:
        _check_state(target, overwrite)
    return target


# --- the lock -----------------------------------------------------------------------------------------------------


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold `.OUT.moemerge-lock` (flock) for the block; a second run into the same target fails at once."""
    lock_path, _ = _names(target)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise OutputError(f"cannot create output beside {target}: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"another moemerge run (pid {holder}) is writing {target}; wait for it or choose another output"
            ) from None
        try:
            current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the lock file was removed by its previous holder between our open and lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # still held: a run that opened the old file sees it is gone and retries
        os.close(fd)


# --- left-overs of killed runs ------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: Path, marker: str) -> int | None:
    """The pid in a staging or retired folder's name (`.OUT<marker>PID-XXXX`), or None for another name."""
    pid, _, token = path.name.partition(marker)[2].partition("-")
    return int(pid) if pid.isdigit() and token else None


def _clean_stale(target: Path) -> None:
    """Remove the staging and retired folders of runs into `target` whose process is gone (called under the lock)."""
    for marker in (PARTIAL_MARKER, RETIRED_MARKER):
        for path in target.parent.glob(f".{target.name}{marker}*"):
            owner = _owner(path, marker)
            if owner is not None and owner != os.getpid() and not _alive(owner):
                shutil.rmtree(path, ignore_errors=True)


def _recover(target: Path) -> None:
    """Finish or undo a journaled two-step placement that a killed run left (called under the lock)."""
    _, journal_path = _names(target)
    try:
        journal = json.loads(journal_path.read_text())
        staging, retired = Path(journal["staging"]), Path(journal["retired"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        journal_path.unlink(missing_ok=True)  # unreadable: written only before the first rename, so nothing moved
        return
    if not target.exists():
        if staging.is_dir():
            os.rename(staging, target)  # killed between the two renames: the new folder was complete, finish
        elif retired.is_dir():
            os.rename(retired, target)  # nothing new to put in place: give the old folder back
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)
    journal_path.unlink(missing_ok=True)
    _sync_folder(target.parent)


# --- moving into place --------------------------------------------------------------------------------------------


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the kernel or file system can't."""
    if os.environ.get(NO_EXCHANGE_ENV):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _sync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (a power cut after we return keeps them)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _place(staging: Path, target: Path) -> None:
    """Move the complete `staging` folder to `target` in one atomic step (journaled two steps as a fallback)."""
    if not target.is_dir() or not any(target.iterdir()):
        os.rename(staging, target)  # onto nothing or an empty folder: atomic; a folder that filled meanwhile fails
        _kill_point("placed")
        return
    if _exchange(staging, target):
        _kill_point("exchanged")  # the old folder now sits under the staging name: the next run removes it
        shutil.rmtree(staging, ignore_errors=True)
        return
    retired = target.parent / f".{target.name}{RETIRED_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    _, journal_path = _names(target)
    journal_path.write_text(json.dumps({"staging": str(staging), "retired": str(retired)}))
    _sync_folder(target.parent)
    _kill_point("journaled")
    os.rename(target, retired)
    _kill_point("retired")  # nothing at the path now: the journal lets the next run finish the move
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(retired, target)  # give the old folder back before reporting
        journal_path.unlink()
        raise
    _sync_folder(target.parent)
    _kill_point("replaced")
    journal_path.unlink()
    shutil.rmtree(retired, ignore_errors=True)


class Interrupts:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, except while the output is being moved into place."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.holding = False
        self.held: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, _frame: object) -> None:
        if self.holding:
            self.held = number
            return
        raise KeyboardInterrupt(signal.Signals(number).name)


@contextmanager
def staged_output(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a new folder beside `target`; when the block succeeds it replaces `target` atomically, when it fails
    (or is interrupted) it is deleted and `target` is untouched."""
    target = Path(target).expanduser().absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output beside {target}: {error.strerror or error}") from None
    with _locked(target), Interrupts() as interrupts:
        _recover(target)
        _clean_stale(target)
        _check_state(target, overwrite)
        staging = target.parent / f".{target.name}{PARTIAL_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(staging)  # the permissions a plain mkdir gives (umask applies), unlike mkdtemp's 0700
        except OSError as error:
            raise OutputError(f"cannot create output beside {target}: {error.strerror or error}") from None
        try:
            try:
                yield staging
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                where = Path(error.filename or staging).name  # a file of the staged output, e.g. tokenizer.json
                raise OutputError(
                    f"disk full while writing {where} of {target}: free space or choose another output"
                ) from None
            _kill_point("staged")
            interrupts.holding = True
            _check_state(target, overwrite)  # again: the target may have changed during a long run
            try:
                _place(staging, target)
            except OSError as error:
                raise OutputError(f"cannot move the finished output to {target}: {error.strerror or error}") from None
            _sync_folder(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            interrupts.holding = False
        if interrupts.held is not None:
            log.warning(
                "%s arrived while the output was being moved; %s is complete",
                signal.Signals(interrupts.held).name,
                target,
            )


def protected_paths() -> Iterable[tuple[str, Path]]:
    """What --overwrite may not replace in this process (for messages and tests)."""
    return _protected()
