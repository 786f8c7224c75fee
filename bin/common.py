"""Shared command-line plumbing: one-line errors, flag suggestions, ``--debug`` tracebacks.

Every tractrain command builds its parser with `ArgumentParser` and calls its work function
through `run`::

    def main(argv=None) -> int:
        args = make_parser().parse_args(argv)
        return run(work, args)
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn

from tractrain import __version__
from tractrain.bin.flags import HelpFormatter, not_one_of
from tractrain.errors import TractrainError
from tractrain.log import configure

EXIT_OS_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# ``prog`` of the parser that parsed last, so that `run` names the command in its messages.
_last_prog: str | None = None


def suggest(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the choice closest to ``name``, or ``""`` if none is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]}?)" if matches else ""


def one_line(message: object) -> str:
    """``message`` as a single line (newlines and runs of spaces collapsed)."""
    return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line, with ``--debug`` and ``--version``.

    Unknown flags and values outside a flag's ``choices`` get the closest known one as a
    suggestion; abbreviated long flags are not accepted (``--max-epoch`` is an unknown flag,
    not ``--max-epochs``). Pass ``prog`` (the installed name, ``tractrain-...``): usage lines,
    errors and ``--version`` then name the command the same way however it was started.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if "--debug" not in self._option_string_actions:
            self.add_argument(
                "--debug", action="store_true", help="show the full traceback on errors"
            )
        if "--version" not in self._option_string_actions:
            self.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                              help="print the command's name and tractrain's version, and exit")

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: error: <message>`` on one line to stderr and exit with status 2
        (argparse's ``argument --flag: ...`` is shortened to ``--flag: ...``, and
        ``argument experiment: ...`` to ``experiment: ...``)."""
        message = re.sub(r"^argument ([^:]*): ", r"\1: ", one_line(message))
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def _check_value(self, action: argparse.Action, value) -> None:
        """A value outside ``choices``: the choices and the closest one (argparse hook)."""
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, not_one_of(value, list(action.choices)))

    def _flags(self) -> list[str]:
        return [flag for flag in self._option_string_actions if flag.startswith("-")]

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        global _last_prog
        _last_prog = self.prog
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            first = extras[0]
            if first.startswith("-") and first != "-":
                flag = first.split("=", 1)[0]
                long_only = flag.startswith("--")
                candidates = [f for f in self._flags() if f.startswith("--") or not long_only]
                self.error(f"unknown flag {flag}{suggest(flag, candidates)}")
            self.error(f"unexpected argument {first!r}")
        return namespace


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` and ``-q/--quiet``: how much the ``tractrain`` logger shows (`run`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also log the training loss every --log-every iterations")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="log warnings and errors only (no line per epoch)")


def verbosity(args: argparse.Namespace) -> int:
    """-1 with ``--quiet``, 1 with ``--verbose``, else 0."""
    return int(bool(getattr(args, "verbose", False))) - int(bool(getattr(args, "quiet", False)))


_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) "
                          r"(is killed by signal: [^.]+|exited unexpectedly)")


def worker_death(error: BaseException) -> str | None:
    """One line for torch's "DataLoader worker (pid X) is killed by signal" error, else None."""
    match = _WORKER_DIED.search(str(error)) if isinstance(error, RuntimeError) else None
    if match is None:
        return None
    return (f"DataLoader worker (pid {match.group(1)}) {match.group(2)} (killed from outside, "
            "often by the out-of-memory killer); continue with tractrain-resume, with fewer "
            "--num-workers, a smaller --batch-size or --cache-gb, or more memory")


class _DebugRelay(logging.Handler):
    """Re-log a record of another library on the ``tractrain`` logger at DEBUG."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("tractrain").debug("%s: %s", record.name, record.getMessage())


# ignite loggers that `ignite.utils.setup_logger` gives a stderr handler of their own (INFO:
# spawn parameters, "Apply torch DistributedDataParallel") unless they exist already
OWN_HANDLER_LOGGERS = ("ignite.distributed.launcher.Parallel",
                       "ignite.distributed.auto.auto_model")


@contextlib.contextmanager
def quiet_ignite(debug: bool):
    """Route ignite's own log lines ("Engine run is terminating due to exception ...", the
    distributed launcher's INFO) to the ``tractrain`` logger at DEBUG, so a batch job's log
    holds tractrain's lines and an error is reported once, by `run`; unchanged with
    ``--debug``."""
    logger = logging.getLogger("ignite")
    if debug:
        yield
        return
    for name in OWN_HANDLER_LOGGERS:  # created first: ignite keeps them, they propagate here
        logging.getLogger(name)
    relay, propagate = _DebugRelay(), logger.propagate
    logger.addHandler(relay)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(relay)
        logger.propagate = propagate


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.filename}: {error.strerror.lower()}"
    return str(error) or type(error).__name__


def run(
    main: Callable[[argparse.Namespace], int | None],
    args: argparse.Namespace,
    prog: str | None = None,
) -> int:
    """Call ``main(args)`` and turn user-facing errors into one line on stderr.

    Returns ``main``'s status (``None`` -> 0). A `TractrainError`, `FileNotFoundError`,
    `FileExistsError`, `PermissionError`, `NotADirectoryError` or `IsADirectoryError` prints
    ``<prog>: error: <message>`` and returns 2, unless ``args.debug`` is set (then it
    propagates with its traceback). Any other `OSError` (a write failing with ENOSPC, EIO, ...)
    prints one line naming the file and the OS error and returns 1: the environment failed,
    not the input; so does a DataLoader worker killed by a signal. Ctrl-C returns 130.
    The ``tractrain`` logger writes to stderr meanwhile (`tractrain.log.configure`, at the
    level of ``--verbose``/``--quiet`` when the command has them).
    """
    prog = prog or _last_prog or os.path.basename(sys.argv[0]) or "tractrain"
    try:
        with configure(verbosity(args)), quiet_ignite(bool(getattr(args, "debug", False))):
            status = main(args)
    except (TractrainError, FileNotFoundError, FileExistsError, PermissionError,
            NotADirectoryError, IsADirectoryError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {one_line(_describe(e))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a failing disk (ENOSPC, EIO...): not the user's input
        if getattr(args, "debug", False):
            raise
        code = errno.errorcode.get(e.errno or 0, "")
        print(f"{prog}: error: {one_line(_describe(e))}{f' ({code})' if code else ''}",
              file=sys.stderr)
        return EXIT_OS_ERROR
    except RuntimeError as e:
        message = worker_death(e)
        if message is None or getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_OS_ERROR
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if status is None else int(status)
