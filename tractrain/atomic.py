"""Crash-safe writes: a file or a whole folder appears complete or not at all.

Folders are written as ``<name>.new``, fsynced, marked complete, then swapped in by rename:
``<name>`` -> ``<name>.old``, ``<name>.new`` -> ``<name>``, ``<name>.old`` removed. When
``<name>`` is a symbolic link (checkpoints on another disk) the swap happens beside the
folder it points to, and the link is kept.
`repair_dir` finishes or rolls back a swap that a crash interrupted. A write that fails (disk
full, I/O error) raises an `OSError` whose ``filename`` is the file or folder being written.

Test-only fault injection (``TRACTRAIN_TEST_FAULT``) lives in `tractrain.faults`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tractrain.faults import FAULT_ENV, fault_point

COMPLETE_MARKER = ".complete"


def _named(err: OSError, path: Path) -> OSError:
    """``err`` with ``filename`` set to ``path`` when the OS did not say which file failed."""
    if err.filename is None and err.errno is not None:
        return type(err)(err.errno, err.strerror or os.strerror(err.errno), str(path))
    return err


def write_file(path: str | os.PathLike, data: bytes, name: str | None = None,
               durable: bool = False) -> None:
    """Write ``data`` to ``path`` (not atomic: for files inside a folder being built), fsynced
    before closing if ``durable``; ``name`` (default: the file's) names the fault event
    ``write:<name>``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        half = len(view) // 2
        _write_all(fd, view[:half])
        if os.environ.get(FAULT_ENV):
            fault_point(f"write:{name or os.path.basename(path)}")
        _write_all(fd, view[half:])
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _alive(pid: str) -> bool:
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files that a killed `atomic_write_bytes` left in
    ``folder`` (those of a process still running are kept); returns them."""
    folder = Path(folder)
    stale = [p for p in sorted(folder.glob(".*.tmp-*")) if folder.is_dir()
             and not _alive(p.name.rpartition("-")[2])]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries (renames, new files), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename.

    ``durable`` also fsyncs the file and its folder (survives power loss, not only a killed
    process); mirrors that can be rebuilt from a checkpoint may skip it.
    """
    path = Path(path)
    atomic_write_files(path.parent, {path.name: data}, durable=durable)


def atomic_write_files(folder: str | os.PathLike, files: dict[str, bytes],
                       durable: bool = True) -> None:
    """Replace the files ``{name: data}`` of ``folder`` together: each is written to a
    temporary beside it, then all are renamed into place.

    A failed write (disk full, I/O error) replaces none of them: the temporaries are removed
    and the `OSError` names the file. ``durable`` (as in `atomic_write_bytes`) also fsyncs
    each file and, once, the folder.
    """
    folder = os.fspath(folder)
    pid = os.getpid()
    moves = [(os.path.join(folder, f".{name}.tmp-{pid}"), os.path.join(folder, name), name,
              data) for name, data in files.items()]
    pending: list[str] = []  # temporaries written and not yet renamed
    current = folder  # what an error names
    try:
        for tmp, path, name, data in moves:
            current = path
            pending.append(tmp)
            write_file(tmp, data, name, durable=durable)
            fault_point(f"replace:{name}")
        for tmp, path, _, _ in moves:
            current = path
            os.replace(tmp, path)
            pending.remove(tmp)
        if durable:
            fsync_path(folder)
    except OSError as err:
        raise _named(err, Path(current)) from err
    finally:
        for tmp in pending:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(Path(dirpath))


def swap_target(target: str | os.PathLike) -> Path:
    """The folder a swap of ``target`` replaces: ``target``, or where it links to."""
    target = Path(target)
    return target.resolve() if target.is_symlink() else target


def swap_candidates(target: str | os.PathLike) -> list[Path]:
    """``[<name>, <name>.new, <name>.old]`` of ``target``'s swap: where a reader finds the
    complete copy (at least one is complete at any moment once it was first written)."""
    real = swap_target(target)
    return [real, real.with_name(real.name + ".new"), real.with_name(real.name + ".old")]


def is_complete(folder: Path) -> bool:
    """True if ``folder`` was fully written by `atomic_write_dir`."""
    return (folder / COMPLETE_MARKER).is_file()


def repair_dir(target: str | os.PathLike) -> None:
    """Finish or roll back an interrupted `atomic_write_dir` swap of ``target``.

    Keeps a complete ``.new`` when ``target`` is gone (crash between the two renames),
    otherwise keeps ``target``; incomplete leftovers are removed.
    """
    target, new, old = swap_candidates(target)
    changed = False
    if not target.exists():
        for candidate in (new, old):
            if candidate.exists() and is_complete(candidate):
                os.replace(candidate, target)
                changed = True
                break
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)
            changed = True
    if changed:
        fsync_path(target.parent)


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a folder with ``write(tmp_folder)`` and swap it in place of ``target``.

    If ``write`` raises (disk full, I/O error), the previous ``target`` is untouched and the
    partial folder is removed before the exception propagates.
    """
    target = Path(target)
    real, new, old = swap_candidates(target)
    try:
        repair_dir(target)
        new.mkdir(parents=True)
        try:
            write(new)
            fault_point(f"{target.name}:written")
            write_file(new / COMPLETE_MARKER, b"ok\n")
            _fsync_tree(new)
            fault_point(f"{target.name}:complete")
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        if real.exists():
            os.replace(real, old)
            fault_point(f"{target.name}:swap")
        os.replace(new, real)
        fsync_path(real.parent)
        if old.exists():
            shutil.rmtree(old)
    except OSError as err:
        raise _named(err, target) from err
    return target
