"""argparse pieces the commands share: fixed-choice values checked with a close-match
suggestion, ``--x/--no-x`` booleans that still take a value, and paths that may not be empty.

argparse's ``choices=`` cannot check a comma-separated list, says nothing about near misses,
and its ``BooleanOptionalAction`` takes no value (``--amp true``, the form config files and
existing scripts use, would be refused; its help also appends a second default), hence
`Choice` and `BoolFlag`.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class Choice(NamedTuple):
    """The values an option accepts; ``many``: a comma-separated list of them (``csv,mlflow``);
    ``aliases``: other words for some of them (``(("true", "auto"),)``); any case."""

    values: tuple[str, ...]
    many: bool = False
    aliases: tuple[tuple[str, str], ...] = ()

    def metavar(self, none: bool = False) -> str:
        """``{a,b,c}`` (argparse's style), ``{a,b,c},...`` for a list; ``none`` listed first
        when the option may be unset."""
        values = ",".join((("none",) if none else ()) + self.values)
        return "{" + values + "}" + (",..." if self.many else "")

    def check(self, value: Any) -> str:
        """``value`` (a string, or for ``many`` a comma list or a sequence of strings) if every
        item is one of the values, as a string (a list joined by commas, ``none`` = ``""``);
        ValueError naming the first item that is not, with the closest value as a suggestion."""
        raw = list(value) if self.many and isinstance(value, list | tuple) else [value]
        items = [self._text(item) for item in raw]
        if self.many:
            items = [part.strip() for item in items for part in str(item).split(",")]
            items = [part for part in items if part]
            if items == ["none"]:  # an explicit empty list
                return ""
        known = {**{v.lower(): v for v in self.values}, **dict(self.aliases)}  # any case
        items = [known.get(item.lower(), item) for item in items]
        for item in items:
            if item not in self.values:
                raise ValueError(not_one_of(item, self.values))
        return ",".join(dict.fromkeys(items)) if self.many else items[0]

    def _text(self, item: Any) -> str:
        """A config file's scalar as text: ``32`` is ``"32"``; a YAML boolean (unquoted
        ``off``/``no``/``false``) is the value among off/false/no (on/true/yes) that is listed."""
        if isinstance(item, bool):
            words = ("on", "true", "yes") if item else ("off", "false", "no")
            return next((w for w in words if w in self.values), str(item).lower())
        return item.strip() if isinstance(item, str) else str(item)


def closest(value: object, values: Iterable[str]) -> str | None:
    """The value of ``values`` closest to ``value`` (case ignored), or None if none is close."""
    values = list(values)
    lowered = {v.lower(): v for v in values}
    matches = difflib.get_close_matches(str(value).lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[matches[0]] if matches else None


def not_one_of(value: object, values: Sequence[str]) -> str:
    """``"'adamw2' is not one of adam, adamw, sgd; did you mean 'adamw'?"``."""
    match = closest(value, values)
    hint = f"; did you mean {match!r}?" if match is not None else ""
    return f"{value!r} is not one of {', '.join(map(str, values))}{hint}"


EMPTY_PATH = "expected a path, got an empty string (an unset shell variable?)"


def path_arg(text: str) -> str:
    """A file or folder argument (argparse type): an empty one, e.g. an unset ``$EXP``, is
    refused rather than read as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(EMPTY_PATH)
    return text


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: object) -> bool:
    """``true``/``yes``/``on``/``1`` or ``false``/``no``/``off``/``0`` (any case)."""
    value = str(text).strip().lower()
    if value in TRUE_WORDS or value in FALSE_WORDS:
        return value in TRUE_WORDS
    raise ValueError(f"expected true or false, got {text!r}")


class BoolFlag(argparse.Action):
    """``--x`` or ``--x VALUE`` (true/false, yes/no, on/off, 1/0); `add_bool_flag` adds the
    matching ``--no-x``."""

    def __init__(self, option_strings: list[str], dest: str, negative: str | None = None,
                 **kwargs) -> None:
        kwargs.update(nargs="?", const=None)
        kwargs.setdefault("metavar", "BOOL")
        super().__init__(option_strings, dest, **kwargs)
        self.negative = negative  # shown beside it in --help

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            value = True if values is None else parse_bool(values)
        except ValueError as err:  # often a positional argument taken as the value
            parser.error(f"{option_string}: {err} (a positional argument goes before "
                         f"{option_string}, or write {option_string} true)")
        setattr(namespace, self.dest, value)


def add_bool_flag(parser, flag: str, dest: str, **kwargs) -> None:
    """``--x [BOOL]`` and ``--no-x`` (no value, so it never takes the next argument) setting
    ``dest`` to True/False (default None: not given)."""
    negative = "--no-" + flag[2:]
    parser.add_argument(flag, dest=dest, default=None, action=BoolFlag, negative=negative,
                        **kwargs)
    parser.add_argument(negative, dest=dest, default=None, action="store_const", const=False,
                        help=argparse.SUPPRESS)


class HelpFormatter(argparse.HelpFormatter):
    """Shows a `BoolFlag` as ``--x [BOOL], --no-x`` (its ``--no-x`` has no help line)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            flags = [f"{f} [{action.metavar}]" for f in action.option_strings]
            return ", ".join(flags + ([action.negative] if action.negative else []))
        return super()._format_action_invocation(action)
