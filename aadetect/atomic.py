"""Writes that are all-or-nothing: a reader sees the old file or the new one, never a mix."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from aadetect.errors import UserError


def _umask() -> int:
    """The process's umask: there is no getter, so it is set and put back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temp file beside `path`, flush it to disk, then rename it over `path`.

    The file gets the mode a plain open() would give it (mkstemp makes it private), or the mode
    of the file it replaces. An error names `path`, not the temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    temp = None
    try:
        # the writer's pid in the name: `remove_abandoned` can tell a killed writer's leftovers from a live one's
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.close(handle)
        temp = Path(temp_name)
        os.chmod(temp, mode)
        write(temp)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except OSError as error:
        if error.filename is None or Path(error.filename) in (temp, path.parent):  # a full disk names no file
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: Path, content: bytes) -> None:
    """Serialise first, then write: a full disk is then an OSError that names `path` (torch's own zip
    writer says only that it failed)."""
    write_atomic(path, lambda temp: temp.write_bytes(content))


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh folder beside `target`; on success it replaces `target` whole, on failure it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; a model folder is for everyone
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable(path: Path) -> None:
    """UserError naming `path` unless it can be created beside its siblings (its nearest existing
    parent folder takes a new file): asked before long work whose result goes there."""
    path = Path(path)
    folder = next((parent for parent in path.parents if parent.exists()), path.parent)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{path}: cannot write there ({error.strerror or error})") from None


def remove_abandoned(target: Path) -> None:
    """Delete what writers that were killed (their process is gone) left beside `target`: staging folders
    and temp files of our own naming (`.NAME.staging-PID-*`, `.NAME.PID-*.tmp`)."""
    name = glob.escape(target.name)
    for leftover in target.parent.glob(f".{name}.staging-*"):
        pid = leftover.name.rsplit(".staging-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)) and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
    _remove_dead_writers_temp_files(target.parent.glob(f".{name}.*-*.tmp"))


def remove_abandoned_temp_files(folder: Path) -> None:
    """Delete the temp files that killed writers left in `folder`."""
    _remove_dead_writers_temp_files(folder.glob(".*.*-*.tmp"))


def _remove_dead_writers_temp_files(paths) -> None:
    for leftover in paths:  # .NAME.PID-RANDOM.tmp, as `write_atomic` names them
        pid = leftover.name.removesuffix(".tmp").rsplit("-", 1)[0].rsplit(".", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)) and not leftover.is_dir():
            leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_directory(source: Path, target: Path) -> None:
    """Move `source` to `target`; an existing target is renamed aside first and removed after."""
    if not target.exists():
        os.rename(source, target)
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, retired)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(retired, target)  # the old folder goes back: nothing is lost
        raise
    shutil.rmtree(retired, ignore_errors=True)
