"""argparse pieces the commands share: fixed-choice values checked with a close-match
suggestion, and ``--x/--no-x`` booleans that still take a value.

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
    """The values an option accepts; ``many``: a comma-separated list of them (``csv,mlflow``)."""

    values: tuple[str, ...]
    many: bool = False

    def metavar(self, none: bool = False) -> str:
        """``{a,b,c}`` (argparse's style), ``{a,b,c}[,...]`` for a list; ``none`` listed first
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


class BoolFlag(argparse.Action):
    """``--x`` (true), ``--no-x`` (false) or ``--x VALUE`` (kept as given, for the option
    table's converter: ``true``/``false``/``yes``/``no``/``on``/``off``/``1``/``0``)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        negative = ["--no-" + flag[2:] for flag in option_strings if flag.startswith("--")]
        kwargs.update(nargs="?", const=None)
        kwargs.setdefault("metavar", "BOOL")
        super().__init__([*option_strings, *negative], dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value (got {values!r})")
            setattr(namespace, self.dest, False)
        else:
            setattr(namespace, self.dest, True if values is None else values)


class HelpFormatter(argparse.HelpFormatter):
    """Shows a `BoolFlag` as ``--x [BOOL], --no-x`` (not ``--no-x [BOOL]``)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            positive = [f for f in action.option_strings if not f.startswith("--no-")]
            negative = [f for f in action.option_strings if f.startswith("--no-")]
            return ", ".join([f"{f} [{action.metavar}]" for f in positive] + negative)
        return super()._format_action_invocation(action)
