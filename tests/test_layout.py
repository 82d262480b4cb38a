"""The README's package layout matches the tree, and its order is the import order.

The layout block lists every top-level module and package of ``src/hjepa`` once, bottom layer
first, and says "each layer imports only the ones above it". These tests hold the code to that
sentence (an import anywhere in a module, function-local ones included, may only name a layer
listed above it or itself) and the README to the tree (no module missing, no stale file name).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hjepa"
ENTRY = re.compile(r"^  ([a-z_0-9]+)(\.py|/)\s")


def layout_block(readme: Path = ROOT / "README.md") -> list[str]:
    """The lines of the code block under the README's "Package layout" heading."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("## Package layout", 1)[1]
    return section.split("```", 2)[1].splitlines()


def layout_entries(lines: list[str]) -> dict[str, str]:
    """``{top-level name: its description lines}`` in README order (src/hjepa entries only)."""
    entries: dict[str, str] = {}
    current, inside = None, False
    for line in lines:
        if line and not line.startswith(" "):  # src/hjepa/, tests/, benchmarks/, docs/
            current, inside = None, line.startswith("src/hjepa/")
            continue
        match = ENTRY.match(line) if inside else None
        if match:
            current = match.group(1)
            assert current not in entries, f"{current} is listed twice in the README layout"
            entries[current] = line
        elif current is not None:
            entries[current] += "\n" + line
    return entries


def top_level_names() -> set[str]:
    """Modules and packages directly under src/hjepa (not ``__init__``/``__main__``)."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    return modules | packages


def imported_layers(path: Path) -> set[str]:
    """The top-level hjepa names a source file imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "hjepa":
                names |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hjepa.")}
    return names


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def upward_imports(order: list[str]) -> list[str]:
    """``"file imports X"`` for each import of a layer listed below the importing one."""
    rank = {name: i for i, name in enumerate(order)}
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = layer_of(path)
        if me not in rank:
            continue
        for name in sorted(imported_layers(path)):
            if name in rank and rank[name] > rank[me]:
                problems.append(f"{path.relative_to(ROOT)} imports hjepa.{name}")
    return problems


def test_the_layout_lists_every_module_once():
    entries = layout_entries(layout_block())
    assert len(entries) >= 10, entries
    assert set(entries) == top_level_names(), (
        f"missing from the README layout: {sorted(top_level_names() - set(entries))}; "
        f"listed but absent: {sorted(set(entries) - top_level_names())}"
    )


def test_files_named_in_the_layout_exist():
    entries = layout_entries(layout_block())
    stale = []
    for name, text in entries.items():
        folder = PACKAGE / name
        if not folder.is_dir():
            continue
        for file in re.findall(r"\b([a-z_0-9]+\.py)\b", text):
            if not (folder / file).exists():
                stale.append(f"{name}/{file}")
    assert stale == [], stale


def test_imports_only_run_up_the_layout():
    order = list(layout_entries(layout_block()))
    assert upward_imports(order) == []


def test_the_check_finds_an_upward_import():
    order = list(layout_entries(layout_block()))
    # Reversing the layout puts cli first: its imports of every other layer become upward.
    problems = upward_imports(order[::-1])
    assert any(p.startswith("src/hjepa/cli.py imports hjepa.") for p in problems), problems
    assert imported_layers(PACKAGE / "cli.py") >= {"config", "train"}


def test_entries_are_parsed_from_the_block():
    lines = [
        "src/hjepa/             header",
        "  grid.py              arithmetic",
        "  data/                tensors.py, masks.py,",
        "                       loader.py",
        "  cli.py               the command",
        "tests/                 pytest",
        "  not_an_entry.py      (below tests/)",
    ]
    entries = layout_entries(lines)
    assert list(entries) == ["grid", "data", "cli"]
    assert "loader.py" in entries["data"] and "loader.py" not in entries["cli"]
