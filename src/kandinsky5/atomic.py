"""Durable, all-or-nothing file writes: temp file beside the target, fsync, rename, fsync the folder.

Every file the package writes (checkpoints, videos, images, sidecars) goes through here, so a crash,
a full disk or Ctrl-C never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_folder",
    "fsync_path",
    "make_parents",
    "new_temp_file",
    "remove_empty",
    "temp_beside",
    "write_json_durable",
]


def temp_beside(dest: Path) -> Path:
    """A hidden name in ``dest``'s folder, so the final ``os.replace`` is a same-filesystem rename."""
    return dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")


def new_temp_file(dest: Path) -> Path:
    """Create an empty temp file beside ``dest`` with mode 0o666 minus the umask.

    Not ``tempfile.mkstemp``: its 0o600 mode would survive the rename.
    """
    tmp = temp_beside(dest)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (which makes a rename durable), to disk."""
    if path.is_dir() and os.name != "posix":
        return  # folders cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durable(path: Path, record: dict[str, Any]) -> None:
    """Write indented UTF-8 JSON and fsync it (``path`` is normally a temp file)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def make_parents(folder: Path) -> list[Path]:
    """Create missing folders down to ``folder``; return the ones created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing


def remove_empty(folders: Iterable[Path]) -> None:
    """Undo ``make_parents`` after a failure, stopping at the first folder someone else wrote to."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break


def atomic_write_folder(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(temp_folder)``, fsync its files, then put the folder at ``dest``, replacing an old one.

    The old folder is renamed aside first and deleted after the new one is in place, so ``dest`` is
    never half-written; on failure the temp folder is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    tmp = temp_beside(dest)
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_path(path)
        if dest.exists():
            old = temp_beside(dest).with_suffix(".old")
            os.rename(dest, old)
            shutil.rmtree(old)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dest.parent)
    return dest


def atomic_write(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(temp_path)``, then move the result to ``dest`` durably; on failure remove the temp.

    Missing parent folders are created (and removed again if the write fails).
    """
    dest = Path(dest)
    created = make_parents(dest.parent)
    tmp = new_temp_file(dest)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_empty(created)
        raise
    fsync_path(dest.parent)
    return dest
