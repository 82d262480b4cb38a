"""The ``cfg`` walk of ``hjepa train``: the files a reader enters following the config object.

Usage::

    python benchmarks/cfg_walk.py [--config quickstart] [--tree] [key=value ...]

The method (issue 28), measured, not read by eye:

1. ``hjepa train`` runs in this process (``hjepa.cli.main``) with the given preset and
   ``train.max_steps=2``, ``train.threads=1`` and a fresh ``run.dir``: a whole run, start to
   last checkpoint, in seconds.
2. From the moment ``load_config`` returns the config to ``cli.py``, every call of a function
   of ``src/hjepa`` that **receives the config** is recorded: one of its arguments is the
   ``Config`` or one of its sections (``cfg.model``, ``cfg.train``, ...), or an hjepa object
   that holds one as an attribute (a method of an object built with ``self.cfg = cfg``); the
   ``whole_config`` count takes only the whole ``Config``, not a section. The config
   package's own functions (``hjepa/config``: the object's methods and checks) are where the
   config lives, not where it travels: they are counted apart, as ``config_calls``.
3. The calls form a calling-context tree: a function called again from the same chain of
   callers (every step, every epoch) is one node. The reader walks it depth first, entering a
   callee's file and returning to the caller's file when the callee's subtree is done.
4. ``files``: the distinct files on the walk (``cli.py`` included). ``climbs``: the moves of
   the walk to a file on a higher layer than the one it leaves (the README's layout block
   orders the layers, bottom first; files of one package share its layer), except the final
   unwinding back to ``cli.py``. ``reentered``: files the walk enters again after it has left
   them.

Prints JSON, both counts (with ``--tree``, the calling contexts on stderr first). The numbers
depend on the preset and the overrides (a regulariser, multi-crop or TensorBoard adds its
modules), so compare one preset. To measure a commit: ``git archive COMMIT | tar -x -C DIR``,
then run this script with ``PYTHONPATH=DIR/src`` (the layers come from ``DIR/README.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path

import hjepa

PACKAGE = Path(hjepa.__file__).resolve().parent
README = PACKAGE.parents[1] / "README.md"
ENTRY = re.compile(r"^  ([a-z_0-9]+)(\.py|/)\s")
CONFIG_LAYER = "config"
CO_GENERATOR_LIKE = 0x20 | 0x80 | 0x200  # generator, coroutine, async generator


def layer_ranks(readme: Path = README) -> dict[str, int]:
    """``{top-level name: rank}`` from the README's layout block, bottom layer first."""
    block = readme.read_text(encoding="utf-8").split("## Package layout", 1)[1].split("```")[1]
    names = [m.group(1) for m in map(ENTRY.match, block.splitlines()) if m]
    return {name: rank for rank, name in enumerate(names)}


def layer_of(file: str) -> str:
    """``train/parts.py`` -> ``train``; ``cli.py`` -> ``cli``."""
    return file.split("/", 1)[0].removesuffix(".py")


class Node:
    """One calling context: ``file`` and ``function`` reached through the chain above it."""

    def __init__(self, file: str, function: str):
        self.file, self.function = file, function
        self.children: dict[tuple[str, str], Node] = {}

    def child(self, file: str, function: str) -> Node:
        return self.children.setdefault((file, function), Node(file, function))


def walk(root: Node) -> list[tuple[str, str]]:
    """The reader's moves depth first: ``("enter", file)`` into a callee in another file and
    ``("return", file)`` back to its caller's file (the final unwinding left out)."""
    moves: list[tuple[str, str]] = []

    def visit(node: Node) -> None:
        for child in node.children.values():
            if child.file != node.file:
                moves.append(("enter", child.file))
            visit(child)
            if child.file != node.file:
                moves.append(("return", node.file))

    visit(root)
    while moves and moves[-1][0] == "return":  # done reading: no climb to count
        moves.pop()
    return moves


def measure(root: Node, ranks: dict[str, int]) -> dict:
    """Files, climbs and re-entered files of the walk from ``root`` (see the module doc)."""
    here, seen, left, climbs, reentered = root.file, [root.file], set(), [], []
    for kind, file in walk(root):
        if ranks[layer_of(file)] > ranks[layer_of(here)]:
            climbs.append(f"{here} -> {file}")
        left.add(here)
        if kind == "enter" and file in left and file not in reentered:
            reentered.append(file)
        if file not in seen:
            seen.append(file)
        here = file
    return {
        "files": len(seen),
        "climbs": len(climbs),
        "reentered": reentered,
        "walk": seen,
        "climbs_from_to": climbs,
    }


class Recorder:
    """A ``sys.setprofile`` hook building the calling-context tree of config-receiving calls."""

    def __init__(self, whole_only: bool):
        self.config_types = _config_types(whole_only)
        self.root = Node("cli.py", "_train")
        self.stack: list[Node] = [self.root]
        self.frames: dict[int, tuple[object, Node | None]] = {}  # live frames we pushed
        self.config_calls = 0
        self.armed = False

    def __call__(self, frame, event: str, arg) -> None:
        code = frame.f_code
        file = _relative(code.co_filename)
        if file is None:
            return
        if not self.armed:  # from the config's birth in cli.py on
            self.armed = event == "return" and code.co_name == "load_config" and arg is not None
        elif event == "call":
            self._call(frame, code, file)
        elif event == "return":
            held, node = self.frames.get(id(frame), (None, None))
            if held is frame and node is not None:
                self.stack.pop()
            if not code.co_flags & CO_GENERATOR_LIKE:  # a generator may resume: keep it
                self.frames.pop(id(frame), None)

    def _call(self, frame, code, file: str) -> None:
        held, node = self.frames.get(id(frame), (None, None))
        if held is frame:  # a generator resumed: its node again
            if node is not None:
                self.stack.append(node)
            return
        node = None
        if self._receives_config(frame, code):
            if layer_of(file) == CONFIG_LAYER:
                self.config_calls += 1
            else:
                node = self.stack[-1].child(file, code.co_qualname)
                self.stack.append(node)
        self.frames[id(frame)] = (frame, node)

    def _receives_config(self, frame, code) -> bool:
        count = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x04)
        count += bool(code.co_flags & 0x08)
        local = frame.f_locals
        for name in code.co_varnames[:count]:
            value = local.get(name)
            values = (
                value.values()
                if isinstance(value, dict)
                else (value if isinstance(value, tuple) else (value,))
            )
            if any(self._is_config(v) or self._holds_config(v) for v in values):
                return True
        return False

    def _is_config(self, value) -> bool:
        return isinstance(value, self.config_types)

    def _holds_config(self, value) -> bool:
        if not type(value).__module__.startswith("hjepa.") or dataclasses.is_dataclass(value):
            return False
        attributes = getattr(value, "__dict__", None) or {}
        return any(isinstance(v, self.config_types) for v in attributes.values())


def _config_types(whole_only: bool) -> tuple[type, ...]:
    """``Config`` and, unless ``whole_only``, its sections (the ``*Config`` dataclasses)."""
    from hjepa.config import Config

    if whole_only:
        return (Config,)
    module = vars(sys.modules[Config.__module__]).values()
    return tuple(
        t
        for t in module
        if isinstance(t, type) and dataclasses.is_dataclass(t) and t.__name__.endswith("Config")
    )


def _relative(filename: str) -> str | None:
    path = Path(filename)
    if path.suffix != ".py" or not path.is_relative_to(PACKAGE):
        return None
    return path.relative_to(PACKAGE).as_posix()


def record(argv: list[str]) -> tuple[Recorder, Recorder]:
    """Run ``hjepa <argv>`` under two recorders: any config object, the whole ``Config`` only."""
    from hjepa.cli import main

    recorders = Recorder(whole_only=False), Recorder(whole_only=True)

    def both(frame, event: str, arg) -> None:
        for recorder in recorders:
            recorder(frame, event, arg)

    sys.setprofile(both)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON alone
            code = main(argv)
    finally:
        sys.setprofile(None)
    if code != 0:
        raise SystemExit(f"hjepa {' '.join(argv)} exited {code}")
    return recorders


def print_tree(node: Node, depth: int = 0) -> None:
    for child in node.children.values():
        print(f"{'  ' * depth}{child.file}: {child.function}", file=sys.stderr)
        print_tree(child, depth + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="quickstart", help="preset or YAML path")
    parser.add_argument("--tree", action="store_true", help="print the calling contexts")
    parser.add_argument("overrides", nargs="*", help="key=value on top of the preset")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fixed = [f"run.dir={tmp}/run", "train.max_steps=2", "train.threads=1"]
        train = ["train", "--config", args.config, *fixed, *args.overrides]
        recorders = record(train)
    if args.tree:
        print_tree(recorders[0].root)
    ranks = layer_ranks()
    result = {"argv": train[1:]}
    for name, recorder in zip(("config_objects", "whole_config"), recorders, strict=True):
        result[name] = measure(recorder.root, ranks) | {"config_calls": recorder.config_calls}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
