"""The one-writer lock of an experiment folder: an exclusive ``flock`` on ``<exp>/.lock``
(`tractrain.experiment.ExperimentDir.lock` takes it). ``fcntl.flock`` directly: the lock must
die with its process (no stale lock after a kill) and name its holder, which the locking
packages on PyPI (filelock, portalocker) do not both give."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from tractrain.errors import ExperimentBusyError


class ExperimentLock:
    """An exclusive ``flock`` on ``<exp>/.lock`` naming its holder's pid.

    Released by `release` (the file is then removed) or by the kernel when the process dies,
    so a killed run never leaves a stale lock. A second writer gets a one-line
    `ExperimentBusyError` naming the holder's pid. Usable as a context manager.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        while self.fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ExperimentBusyError(
                    f"{path.parent}: in use by another tractrain process (pid {holder}); "
                    "wait for it to finish or stop it first") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file as we opened it: retry
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> ExperimentLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
