"""JSON and YAML documents read safely: a mapping, at most `MAX_DEPTH` levels deep, YAML
without aliases (a small file cannot expand to gigabytes), one-line `ConfigError` otherwise."""

from __future__ import annotations

from typing import Any

from tractrain.errors import ConfigError

MAX_DEPTH = 20


def _no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """`yaml.SafeLoader` that refuses aliases (``*name``) instead of expanding them."""

        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"YAML alias *{event.anchor} at line "
                                     f"{event.start_mark.line + 1} is not allowed")
            return super().compose_node(parent, index)

    return NoAliasLoader


def depth(value: Any) -> int:
    """Nesting depth of lists and dicts in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            stack.extend((v, level) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def load_mapping(text: str, where: str, yaml: bool = False) -> dict:
    """The mapping a JSON (or YAML) ``text`` holds; ``where`` names it in errors. An empty
    YAML document is an empty mapping."""
    kind = "YAML" if yaml else "JSON"
    try:
        if yaml:
            import yaml as pyyaml

            data = pyyaml.load(text, Loader=_no_alias_loader())  # noqa: S506 (safe loader)
            data = {} if data is None else data
        else:
            import json

            data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    except Exception as err:  # json and yaml raise different types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{where}: not valid {kind} ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of names to values, got "
                          f"{type(data).__name__}")
    if depth(data) > MAX_DEPTH:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    return data
