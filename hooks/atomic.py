"""Crash-safe writes: a file or a whole folder appears complete or not at all.

Folders are written as ``<name>.new``, fsynced, marked complete, then swapped in by rename:
``<name>`` -> ``<name>.old``, ``<name>.new`` -> ``<name>``, ``<name>.old`` removed.
`repair_dir` finishes or rolls back a swap that a crash interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = ".complete"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def is_complete(folder: Path) -> bool:
    """True if ``folder`` was fully written by `atomic_write_dir`."""
    return (folder / COMPLETE_MARKER).is_file()


def repair_dir(target: str | os.PathLike) -> None:
    """Finish or roll back an interrupted `atomic_write_dir` swap of ``target``.

    Keeps a complete ``.new`` when ``target`` is gone (crash between the two renames),
    otherwise keeps ``target``; incomplete leftovers are removed.
    """
    target = Path(target)
    new, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    if not target.exists():
        if new.exists() and is_complete(new):
            os.replace(new, target)
        elif old.exists() and is_complete(old):
            os.replace(old, target)
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    if target.parent.exists():
        fsync_dir(target.parent)


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a folder with ``write(tmp_folder)`` and swap it in place of ``target``.

    If ``write`` raises (disk full, I/O error), the previous ``target`` is untouched and the
    partial folder is removed before the exception propagates.
    """
    target = Path(target)
    repair_dir(target)
    new, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    new.mkdir(parents=True)
    try:
        write(new)
        (new / COMPLETE_MARKER).write_text("ok\n")
        _fsync_tree(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)
    return target
