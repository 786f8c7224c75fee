"""The ``tractrain`` logger's console output, configured once by the command-line tools.

Library code logs to ``logging.getLogger("tractrain...")`` and never prints; `configure`
(called by `tractrain.bin.common.run`) sends those records to stderr, one plain line each,
whether or not stderr is a terminal. Lines are written through ``tqdm.write`` so that they
never garble progress bars.
"""

from __future__ import annotations

import contextlib
import logging
import sys

LOGGER = "tractrain"
QUIET, NORMAL, VERBOSE = -1, 0, 1
LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}


class TqdmHandler(logging.Handler):
    """Write each record on its own line to the current ``sys.stderr`` via ``tqdm.write``
    (above any progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


@contextlib.contextmanager
def configure(verbosity: int = NORMAL):
    """While active, the ``tractrain`` logger writes to stderr at the level of ``verbosity``
    (`QUIET`: warnings and errors, `NORMAL`: + one line per epoch and events, `VERBOSE`: +
    debug, e.g. iteration lines); the previous configuration is restored afterwards."""
    logger = logging.getLogger(LOGGER)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(LEVELS[max(QUIET, min(VERBOSE, verbosity))])
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
