"""Reading a config: packaged presets and YAML files (with ``base:`` chains), ``key=value``
overrides, each value coerced to the schema's type; an unknown or mistyped key is an error that
names the closest valid key. The result is checked by :func:`hjepa.config.rules.validate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from hjepa.config.rules import check_modes, validate
from hjepa.config.schema import SCHEMA, Config, ConfigError, valid_keys


def _closest_key(key: str, options: list[str]) -> str | None:
    """The valid key a mistyped one most likely meant.

    A bare name (``batch_size``) is matched against the last component of every key, so it
    finds ``train.batch_size``; among keys sharing that name, ``train.*`` comes first (the
    settings a user reaches for most). Dotted keys are matched whole (``modle.embed_dim``).
    """
    if "." not in key:
        tails = {}
        for option in sorted(options, key=lambda o: (not o.startswith("train."), o)):
            tails.setdefault(option.rsplit(".", 1)[-1], option)
        close = difflib.get_close_matches(key, list(tails), n=1, cutoff=0.6)
        if close:
            return tails[close[0]]
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown(key: str, options: list[str]) -> ConfigError:
    close = _closest_key(key, options)
    hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(options)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:  # a choice: a string here, checked against the choices by validate
        return _coerce(key, value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list like [1, 2], got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads '1e3' (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '2e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _set(cfg: Config, key: str, value: Any) -> None:
    *path, name = key.split(".")
    node: Any = cfg
    for part in path:  # walk sections and nested groups (data -> augment)
        child = getattr(node, part) if part in typing.get_type_hints(type(node)) else None
        if not dataclasses.is_dataclass(child):
            raise _unknown(key, valid_keys())
        node = child
    hints = typing.get_type_hints(type(node))
    if not path or name not in hints:
        raise _unknown(key, valid_keys())
    if dataclasses.is_dataclass(getattr(node, name)):
        if not isinstance(value, dict):  # a group: 'data.augment={mixup: 0.2}' sets its keys
            first = next(k for k in SCHEMA if k.startswith(f"{key}.")).rsplit(".", 1)[-1]
            raise ConfigError(f"{key} is a group of settings: set {key}.{first}=... instead")
        for sub_key, sub_value in _flatten(value).items():
            _set(cfg, f"{key}.{sub_key}", sub_value)
        return
    setattr(node, name, _coerce(key, value, hints[name]))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def preset_names() -> list[str]:
    files = resources.files("hjepa") / "configs"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last one and drops the first without a word: a section written twice loses half)."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, typing.Hashable) and key in first_line:
            raise yaml.constructor.ConstructorError(
                problem=f"key {key!r} appears twice (lines {first_line[key]} and {line}): "
                "merge them into one",
                problem_mark=key_node.start_mark,
            )
        if isinstance(key, typing.Hashable):
            first_line[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def strict_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def _parse_yaml(text: str, source: str) -> Any:
    """:func:`strict_yaml` whose errors are one line: ``source:line:column: problem``."""
    try:
        return strict_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


NO_BASE = "defaults"  # ``base: defaults``: start from the schema defaults themselves


@dataclass(frozen=True)
class _Source:
    """Where a config comes from: a YAML file or a packaged preset."""

    label: str  # as messages name it: the path, or "preset NAME"
    identity: str  # the same for every way of naming it (cycle detection)
    text: str
    folder: Path | None  # a file's folder: relative bases resolve against it


def _locate(name_or_path: str, folder: Path | None = None) -> _Source:
    path = Path(name_or_path)
    if folder is not None and not path.is_absolute():
        path = folder / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        return _Source(str(path), str(path.resolve()), path.read_text(), path.resolve().parent)
    res = resources.files("hjepa") / "configs" / f"{name_or_path}.yaml"
    if not res.is_file():
        raise ConfigError(
            f"unknown preset '{name_or_path}'; presets: {', '.join(preset_names())}"
            f" (or give a path to a .yaml file, or '{NO_BASE}' for the schema defaults)"
        )
    return _Source(f"preset {name_or_path}", f"preset {name_or_path}", res.read_text(), None)


def _resolve(
    source: _Source, chain: tuple[_Source, ...] = (), packaged_only: bool = False
) -> dict[str, Any]:
    """The flat ``{dotted key: value}`` a config file stands for, its bases merged under it.

    A file that starts with ``base: PRESET_OR_PATH`` holds only its changes to that base
    (which may name a base of its own). A file without ``base:`` must set every key, as the
    resolved config a run writes does: a partial file would otherwise start from the bare
    schema defaults, which is rarely what its author meant. ``packaged_only``: only the
    packaged presets' part of the chain.
    """
    chain = (*chain, source)
    tree = _parse_yaml(source.text, source.label) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config {source.label} must be a mapping of sections")
    base = tree.pop("base", None)
    flat = _flatten(tree)
    scratch = Config()
    for key, value in flat.items():  # unknown keys and bad types, named with the file
        try:
            _set(scratch, key, value)
        except ConfigError as e:
            raise ConfigError(f"{source.label}: {e}") from None
    own = flat if source.folder is None or not packaged_only else {}
    if base is None:
        missing = [k for k in SCHEMA if k not in flat]
        if missing:
            raise ConfigError(
                f"{source.label} sets {len(SCHEMA) - len(missing)} of {len(SCHEMA)} keys and names"
                " no base: start it with 'base: quickstart' (or another preset or a YAML path) to"
                f" take the rest from there, or 'base: {NO_BASE}' for the schema defaults"
            )
        return own
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{source.label}: base must name a preset or a YAML file, got {base!r}")
    if base == NO_BASE:
        return own
    parent = _locate(base, source.folder)
    if any(parent.identity == c.identity for c in chain):
        names = " -> ".join(c.label for c in (*chain, parent))
        raise ConfigError(f"config bases form a cycle: {names}")
    return {**_resolve(parent, chain, packaged_only), **own}


def resolve_config_file(name_or_path: str) -> dict[str, Any]:
    """The flat ``{dotted key: value}`` of a preset or YAML file with its ``base:`` chain."""
    return _resolve(_locate(name_or_path))


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.max_steps=100")
    key, _, raw = item.partition("=")
    if not raw.strip():
        return key.strip(), ""
    try:
        return key.strip(), strict_yaml(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(
            f"override '{item}': the value after '=' is not valid YAML ({problem}); quote it "
            "or write a list as [a, b]"
        ) from None


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- preset/YAML file <- ``key=value`` overrides, then validation."""
    cfg = Config()
    if preset:
        for key, value in resolve_config_file(preset).items():
            _set(cfg, key, value)
    for item in overrides:
        _set(cfg, *parse_override(item))
    # A packaged preset's values count as defaults: quickstart's sigreg_weight does not stop
    # `loss.regularizer=none` on top of it; a value the user gave does.
    validate(cfg, presets=_resolve(_locate(preset), packaged_only=True) if preset else {})
    return cfg


def from_dict(tree: dict[str, Any]) -> Config:
    """A stored config (a checkpoint's, a run's config.yaml, an exported card's), validated.

    An exported card clears ``run.dir`` (no local paths in a shared file): a stored config
    rebuilds a model and starts no run, so it is the one place an empty ``run.dir`` is read.
    """
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, key, value)
    validate(cfg, stored=True)
    return cfg


def from_stored(
    tree: dict[str, Any], overrides: Sequence[str] = (), allowed: Sequence[str] = ("eval.",)
) -> Config:
    """A run's stored config (``tree``) with ``key=value`` overrides of the keys a command may
    change (``allowed``: exact keys or ``section.`` prefixes; the model is fixed by the run).

    The stored values count as the defaults of :func:`check_modes`: an override that the mode
    it leaves ignores is refused (``eval.robustness_limit=500`` with ``eval.robustness=false``),
    a stored value is not.
    """
    stored = _flatten(tree)
    cfg = from_dict(tree)
    for item in overrides:
        key, value = parse_override(item)
        if not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            names = ", ".join(a + "*" if a.endswith(".") else a for a in allowed)
            raise ConfigError(
                f"this command accepts only {names} overrides (the model is fixed by the run), "
                f"got '{key}'"
            )
        _set(cfg, key, value)
    validate(cfg, stored=True)
    check_modes(cfg, presets=stored)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
