"""Static checks of the package structure (parsed with `ast`, nothing imported).

- ``data/`` is the functional core: it imports neither ``tractrain.engine`` nor
  ``tractrain.hooks`` (not even inside a function).
- A hook imports no other hook module except the shared ``tractrain.hooks.monitor``.
- No shipped module is over 400 lines, no class over 200 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("data", "engine", "hooks", "bin", "generation", "examples", "tractrain")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200
HOOKS_MAY_IMPORT = {"tractrain.hooks.monitor"}


def modules(folder: str) -> list[Path]:
    """The ``.py`` files of a top-level package folder, sorted."""
    return sorted((ROOT / folder).rglob("*.py"))


def imported(source: str) -> set[str]:
    """Dotted names a module imports anywhere (functions included): ``import a.b`` gives
    ``a.b``, ``from a import b`` gives ``a.b`` (b may be a module or a name in a)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_import_finder_sees_imports_inside_functions():
    source = "def f():\n    from tractrain.hooks import logs\n    import tractrain.engine.fit\n"
    assert imported(source) == {"tractrain.hooks.logs", "tractrain.engine.fit"}


@pytest.mark.parametrize("folder", SHIPPED)
def test_every_shipped_folder_has_modules(folder):
    assert modules(folder), f"{folder}/: no modules, the structure checks would pass vacuously"


def test_data_imports_neither_engine_nor_hooks():
    bad = [
        f"{rel(path)}: imports {name} (data/ may not import tractrain.engine or tractrain.hooks)"
        for path in modules("data")
        for name in sorted(imported(path.read_text()))
        if within(name, "tractrain.engine") or within(name, "tractrain.hooks")
    ]
    assert not bad, "\n".join(bad)


def test_a_hook_imports_no_other_hook_but_the_monitor():
    bad = []
    for path in modules("hooks"):
        own = f"tractrain.hooks.{path.stem}"
        for name in sorted(imported(path.read_text())):
            if within(name, "tractrain.hooks") and name != "tractrain.hooks" and name != own \
                    and not any(within(name, ok) for ok in HOOKS_MAY_IMPORT):
                bad.append(f"{rel(path)}: imports {name} (a hook may import only "
                           f"{sorted(HOOKS_MAY_IMPORT)} among the hooks)")
    assert not bad, "\n".join(bad)


def test_no_shipped_module_over_the_line_limit():
    bad = []
    for folder in SHIPPED:
        for path in modules(folder):
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES:
                bad.append(f"{rel(path)}: {n} lines (limit {MAX_MODULE_LINES} per module)")
    assert not bad, "\n".join(bad)


def test_no_shipped_class_over_the_line_limit():
    bad = []
    for folder in SHIPPED:
        for path in modules(folder):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    n = node.end_lineno - first + 1
                    if n > MAX_CLASS_LINES:
                        bad.append(f"{rel(path)}: class {node.name} has {n} lines "
                                   f"(limit {MAX_CLASS_LINES} per class)")
    assert not bad, "\n".join(bad)
