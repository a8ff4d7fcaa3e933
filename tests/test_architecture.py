"""The package's architecture rules, checked on its source.

* Layers point one way: the import-linter contracts in ``pyproject.toml``
  (adapters -> API -> manager -> fronts -> core -> session source -> base).
* No module uses another module's private (underscore) names: not by import,
  and not through an attribute of an object or module (``manager._open_sync``),
  which no import checker sees.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sessionscope"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_privates(tree: ast.Module) -> set[str]:
    """Private names a module defines: module-level names, class attributes and
    methods, and attributes it assigns on ``self``/``cls``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return {name for name in names if _private(name)}


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def test_no_module_uses_another_modules_private_names() -> None:
    modules = _modules()
    defined = {name: _defined_privates(tree) - set(modules) for name, tree in modules.items()}
    violations: list[str] = []
    for name, tree in modules.items():
        others = set().union(*(d for other, d in defined.items() if other != name))
        own = defined[name]
        for node in ast.walk(tree):
            # ``from . import _core`` imports a module of the package: allowed.
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                for alias in node.names:
                    if _private(alias.name):
                        violations.append(f"{name}: imports {alias.name} from .{node.module}")
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if node.attr in others and node.attr not in own:
                    violations.append(f"{name}:{node.lineno}: uses {ast.unparse(node)}")
    assert violations == []


def test_the_layer_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (it is in the dev dependency group)")
    result = subprocess.run(
        [str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout
