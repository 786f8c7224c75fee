"""Test-only fault injection for the crash-safe writes of `tractrain.atomic` (default off).

``TRACTRAIN_TEST_FAULT=<event>[@n][=kill|ENOSPC|EIO],...`` makes the process SIGKILL itself
(``kill``, the default) or fail as a disk would (``OSError``) the n-th time (default 1st) it
reaches ``event``. Events, ``<name>`` being the file or folder name: ``write:<name>`` (half of a
file's bytes written), ``replace:<name>`` (temporary file complete, before the rename),
``<name>:written`` (folder files written, not marked complete), ``<name>:complete`` (marked
complete, before the swap), ``<name>:swap`` (old folder moved aside, new one not yet in place).
"""

from __future__ import annotations

import errno as _errno
import os
import signal

FAULT_ENV = "TRACTRAIN_TEST_FAULT"
_fault_counts: dict[str, int] = {}


def fault_point(event: str) -> None:
    """Test hook (no-op unless ``TRACTRAIN_TEST_FAULT`` names ``event``): kill or fail here."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, action = item.partition("=")
        name, _, nth = name.partition("@")
        if name != event:
            continue
        _fault_counts[event] = _fault_counts.get(event, 0) + 1
        if _fault_counts[event] != int(nth or 1):
            continue
        if action in ("", "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        code = getattr(_errno, action)
        raise OSError(code, os.strerror(code))
