"""The README's layout table matches the tree: every module and package of ``qkdd/`` and
``drivers/`` is named in it, and every path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Layout")
    return readme[start : readme.index("\n## ", start)]


def test_every_module_and_package_is_named() -> None:
    table = layout_section()
    missing = []
    for top in ("qkdd", "drivers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if path.name == "__init__.py" or "__pycache__" in relative.parts:
                continue
            package = relative.parent
            # A module is named by its path or its file name; a module of a subpackage may
            # also be covered by its package's row.
            if (
                str(relative) not in table
                and f"`{path.name}`" not in table
                and (package == Path(top) or f"`{package}/`" not in table)
            ):
                missing.append(str(relative))
        for package in sorted(p for p in (ROOT / top).rglob("*") if p.is_dir()):
            relative = package.relative_to(ROOT)
            if "__pycache__" in relative.parts or not (package / "__init__.py").exists():
                continue
            if f"`{relative}/`" not in table:
                missing.append(f"{relative}/")
    assert not missing, f"not in README's layout table: {missing}"


def test_every_path_it_names_exists() -> None:
    named = re.findall(r"`((?:qkdd|drivers|docs|config|systemd)/[\w./]*)`", layout_section())
    assert named, "the layout table names no path"
    absent = [path for path in named if not (ROOT / path).exists()]
    assert not absent, f"README's layout table names paths that do not exist: {absent}"
