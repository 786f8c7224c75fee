"""``package.module:name`` -> object: the one place tractrain imports code named by a string.

A name that comes from the user (a flag, a config file given on the command line, a Python
argument) is imported as is. A name read from an experiment folder (``config.json``'s
``model``/``loss``, ``best_model/config.json``'s ``factory``) is data written by whoever
shared the folder: `import_recorded` imports it only if it is tractrain's own
(``tractrain.examples.*``) or the caller says the folder is trusted. The check looks at the
string only, before anything is imported (importing a module runs its code).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from tractrain.errors import ConfigError

BUILTIN_PACKAGE = "tractrain.examples"
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_NAME = re.compile(r"[A-Za-z_]\w*")


def split_spec(spec: object, option: str) -> tuple[str, str]:
    """``(module, name)`` of ``package.module:name`` or ``path/to/file.py:name``; one-line
    `ConfigError` if malformed."""
    expected = f"--{option} {spec!r}: expected package.module:name or path/to/file.py:name"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(expected)
    module, name = spec.split(":")
    if not (_MODULE.fullmatch(module) or is_file_spec(module)) or not _NAME.fullmatch(name):
        raise ConfigError(expected)
    return module, name


def is_file_spec(module: str) -> bool:
    """True if the module part names a Python file (``path/to/file.py``)."""
    return module.endswith(".py") or "/" in module or os.sep in module


def absolute_spec(spec: object) -> object:
    """``path/to/file.py:name`` with the file's resolved absolute path (as `import_file` loads
    it), so that a recorded spec names the same file from any directory; any other value
    unchanged. Recording it does not make it trusted (`check_recorded`)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return spec
    module, name = spec.split(":")
    if not module or not is_file_spec(module):
        return spec
    return f"{Path(module).expanduser().resolve()}:{name}"


def is_builtin(spec: object) -> bool:
    """True if ``spec`` names an object of tractrain's own examples (safe to import)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return False
    module = spec.split(":")[0]
    return module == BUILTIN_PACKAGE or module.startswith(BUILTIN_PACKAGE + ".")


def import_object(spec: str, option: str) -> Callable:
    """The callable named by ``package.module:name`` or ``path/to/file.py:name`` (a name the
    user gave; the file is loaded by path under a module name of its own); one-line
    `ConfigError` otherwise."""
    module_name, attr = split_spec(spec, option)
    if is_file_spec(module_name):
        module = import_file(Path(module_name), f"--{option} {spec!r}")
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"--{option} {spec!r}: cannot import {module_name!r} ({err})"
                              f"{_import_hint(err, module_name)}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise ConfigError(f"--{option} {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(obj):
        raise ConfigError(f"--{option} {spec!r}: {attr!r} is not callable")
    return obj


def _import_hint(err: ImportError, module_name: str) -> str:
    """How to make ``module_name`` importable, when it is the module itself that is missing."""
    missing = getattr(err, "name", None)
    if not missing or not (module_name + ".").startswith(missing + "."):
        return ""
    return ("; running from the folder that holds it is not enough: add that folder to "
            "PYTHONPATH (PYTHONPATH=/path/to/folder tractrain-train ...), install your package "
            "(pip install -e .), or give the file: path/to/file.py:name")


def import_file(path: Path, where: str):
    """The module of the Python file ``path``, loaded once per resolved path (as
    ``tractrain_user_<stem>_<hash>``, kept in ``sys.modules``)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: no such file {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"tractrain_user_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


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
