"""``package.module:name`` -> object: the one place tractrain imports code named by a string.

A name that comes from the user (a flag, a config file given on the command line, a Python
argument) is imported as is. A name read from an experiment folder (``config.json``'s
``model``/``loss``, ``best_model/config.json``'s ``factory``) is data written by whoever
shared the folder: `import_recorded` imports it only if it is tractrain's own
(``tractrain.examples.*``) or the caller says the folder is trusted. The check looks at the
string only, before anything is imported (importing a module runs its code).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from tractrain.errors import ConfigError

BUILTIN_PACKAGE = "tractrain.examples"
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_NAME = re.compile(r"[A-Za-z_]\w*")


def split_spec(spec: object, option: str) -> tuple[str, str]:
    """``(module, name)`` of ``package.module:name``; one-line `ConfigError` if malformed."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"--{option} {spec!r}: expected package.module:name")
    module, name = spec.split(":")
    if not _MODULE.fullmatch(module) or not _NAME.fullmatch(name):
        raise ConfigError(f"--{option} {spec!r}: expected package.module:name")
    return module, name


def is_builtin(spec: object) -> bool:
    """True if ``spec`` names an object of tractrain's own examples (safe to import)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return False
    module = spec.split(":")[0]
    return module == BUILTIN_PACKAGE or module.startswith(BUILTIN_PACKAGE + ".")


def import_object(spec: str, option: str) -> Callable:
    """The callable named by ``package.module:name`` (a name the user gave); one-line
    `ConfigError` otherwise."""
    module_name, attr = split_spec(spec, option)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"--{option} {spec!r}: cannot import {module_name!r} ({err})") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise ConfigError(f"--{option} {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(obj):
        raise ConfigError(f"--{option} {spec!r}: {attr!r} is not callable")
    return obj


def check_recorded(spec: object, option: str, source: str, trusted: bool, allow: str) -> None:
    """Refuse, without importing anything, a name read from ``source`` (a file of an
    experiment folder) unless it is tractrain's own or ``trusted``. ``allow`` tells the user
    how to allow it (e.g. "pass --model NAME or --trust-experiment")."""
    if trusted or is_builtin(spec):
        return
    raise ConfigError(f"{source} asks to import and run {option} {spec!r}, code from outside "
                      f"tractrain; refused (an experiment folder is data, not code). If you "
                      f"trust it, {allow}")


def import_recorded(spec: object, option: str, source: str, trusted: bool,
                    allow: str) -> Callable:
    """`check_recorded`, then `import_object`."""
    check_recorded(spec, option, source, trusted, allow)
    return import_object(spec, option)  # type: ignore[arg-type]
