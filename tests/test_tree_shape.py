"""The source tree keeps the shape that makes it readable: one name per idea (no two
modules, and no two classes, of the same name in ``qkdd/`` and ``drivers/``), and no module
over 750 lines."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 750


def modules() -> list[Path]:
    found = []
    for top in ("qkdd", "drivers"):
        found += [p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts]
    assert found, "no module found"
    return sorted(found)


def test_no_two_modules_share_a_name() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in modules():
        if path.name != "__init__.py":
            by_name[path.name].append(str(path.relative_to(ROOT)))
    assert not {n: p for n, p in by_name.items() if len(p) > 1}


def test_no_two_classes_share_a_name() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                by_name[node.name].append(str(path.relative_to(ROOT)))
    assert not {n: p for n, p in by_name.items() if len(p) > 1}


def test_no_module_is_over_750_lines() -> None:
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules()}
    assert not {path: n for path, n in lines.items() if n > MAX_MODULE_LINES}
