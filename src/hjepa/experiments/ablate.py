"""``hjepa ablate``: a study of training variants over seeds, resumable, with one report.

A *variant* is a name and a list of ``key=value`` overrides. Each (variant, seed) pair is a
normal training run in ``OUT/runs/<name>_s<seed>`` (preset, then the shared overrides, then
the variant's, then ``train.seed`` and ``run.dir``), followed by ``evaluate_run`` and the run's
``report.md``. A run with an ``eval.json`` is finished and skipped; one with a checkpoint but no
``eval.json`` resumes (the trainer continues from ``last.pt``, or returns at once when training
had finished and only the evaluation was missing). At the end ``OUT/ablation.md``,
``OUT/ablation.png``, ``OUT/correlation.{md,json}`` and ``OUT/report.md`` are (re)written from
every run that has been evaluated.

Variants come from the review study (the default), a cartesian grid (``--grid``) or a
variants file (``name|key=value ...`` lines, as in ``benchmarks/variants/``).
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hjepa.config import Config, ConfigError, load_config
from hjepa.experiments.report import SEED_SUFFIX, write_ablation_report, write_eval_report


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


#: The review study: a reviewed H-JEPA code base's two critical bugs, each fix, then SIGReg on
#: top of both fixes. ``loss.regularizer`` is explicit because presets (quickstart) may switch
#: SIGReg on.
REVIEW_STUDY: tuple[Variant, ...] = (
    Variant(
        "baseline",
        ("train.ema_timing=before_step", "masking.scale_mode=geometric", "loss.regularizer=none"),
    ),
    Variant(
        "ema_fix",
        ("train.ema_timing=after_step", "masking.scale_mode=geometric", "loss.regularizer=none"),
    ),
    Variant(
        "mask_fix",
        ("train.ema_timing=after_step", "masking.scale_mode=constant", "loss.regularizer=none"),
    ),
    Variant(
        "sigreg",
        ("train.ema_timing=after_step", "masking.scale_mode=constant", "loss.regularizer=sigreg"),
    ),
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def split_values(raw: str) -> list[str]:
    """Grid values: split on ``|`` when present, else on commas outside brackets.

    ``1,2,3`` -> ``['1', '2', '3']``; ``[1,0.5]|[1,0.7]`` -> ``['[1,0.5]', '[1,0.7]']``;
    ``[1,0.5],[1,0.7]`` -> the same.
    """
    if "|" in raw:
        parts = raw.split("|")
    else:
        parts, depth, current = [], 0, ""
        for ch in raw:
            depth += {"[": 1, "]": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += ch
        parts.append(current)
    values = [p.strip() for p in parts]
    if not all(values):
        raise ConfigError(f"grid values {raw!r} contain an empty value")
    return values


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` -> ``(key, [v1, v2])``."""
    key, sep, raw = spec.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise ConfigError(f"--grid {spec!r} must look like key=v1,v2 (e.g. model.levels=1,2,3)")
    return key.strip(), split_values(raw)


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", value).strip("_") or "x"


def grid_variants(specs: Sequence[str]) -> list[Variant]:
    """The cartesian product of several ``--grid`` specs as named variants.

    Names join ``<key>-<value>`` parts with ``__``, where ``<key>`` is the last dotted component
    (the full key when two grid keys share it), e.g. ``levels-2__level_weights-1_0.5``.
    """
    grids = [parse_grid(s) for s in specs]
    keys = [k for k, _ in grids]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid keys must be distinct, got {keys}")
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = [s if short.count(s) == 1 else k.replace(".", "-") for s, k in zip(short, keys)]
    variants = []
    for combo in itertools.product(*(values for _, values in grids)):
        name = "__".join(f"{label}-{_slug(v)}" for label, v in zip(labels, combo))
        overrides = tuple(f"{k}={v}" for k, v in zip(keys, combo))
        variants.append(Variant(name, overrides))
    return variants


def read_variants(path: str | Path) -> list[Variant]:
    """``name|key=value key=value`` lines (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"variants file {path} not found")
    variants = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, rest = line.partition("|")
        if not sep or not name.strip():
            raise ConfigError(f"{path}:{number}: expected 'name|key=value ...', got {line!r}")
        variants.append(Variant(name.strip(), tuple(shlex.split(rest))))
    return variants


@dataclass(frozen=True)
class PlannedRun:
    variant: Variant
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]  # everything on top of the preset, in order

    @property
    def name(self) -> str:
        return self.run_dir.name

    def status(self) -> str:
        """``done`` (evaluated), ``partial`` (has a checkpoint) or ``new``."""
        if (self.run_dir / "eval.json").is_file():
            return "done"
        if (self.run_dir / "checkpoints" / "last.pt").is_file():
            return "partial"
        return "new"


def plan_runs(
    variants: Sequence[Variant], seeds: Sequence[int], out_dir: str | Path, extra: Sequence[str]
) -> list[PlannedRun]:
    """One run per (variant, seed), variant-major; names and seeds are checked."""
    if not variants:
        raise ConfigError("the ablation has no variants")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers, got {list(seeds)}")
    names = [v.name for v in variants]
    for name in names:
        if not _NAME.match(name) or SEED_SUFFIX.search(name):
            raise ConfigError(
                f"variant name {name!r} must use letters, digits, '.', '_', '-' and not end in "
                "_s<number> (the seed suffix)"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be distinct, got {names}")
    runs = []
    for variant in variants:
        for seed in seeds:
            run_dir = Path(out_dir) / "runs" / f"{variant.name}_s{seed}"
            overrides = (*extra, *variant.overrides, f"train.seed={seed}", f"run.dir={run_dir}")
            runs.append(PlannedRun(variant, seed, run_dir, overrides))
    return runs


def describe(runs: Sequence[PlannedRun], preset: str, extra: Sequence[str]) -> str:
    """Markdown description of the plan: preset, shared overrides, variants, run status."""
    lines = [
        f"Preset `{preset}`; shared overrides: `{' '.join(extra) or '(none)'}`.",
        "",
        "| run | status | variant overrides |",
        "|---|---|---|",
    ]
    for run in runs:
        overrides = " ".join(run.variant.overrides) or "(preset)"
        lines.append(f"| {run.name} | {run.status()} | `{overrides}` |")
    return "\n".join(lines) + "\n"


def _default_train(cfg: Config) -> Any:
    from hjepa.train.trainer import train

    return train(cfg)


def _default_eval(run_dir: Path) -> dict[str, Any]:
    from hjepa.eval.runner import evaluate_run

    return evaluate_run(run_dir)


def run_ablation(
    variants: Sequence[Variant],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    preset: str | None = "quickstart",
    extra: Sequence[str] = (),
    title: str = "Ablation",
    train_fn: Callable[[Config], Any] = _default_train,
    eval_fn: Callable[[Path], dict[str, Any]] = _default_eval,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Train and evaluate every unfinished run, then write the study's reports.

    Every run's config is built (and so validated) before any training starts. ``train_fn``
    and ``eval_fn`` default to :func:`hjepa.train.trainer.train` and
    :func:`hjepa.eval.runner.evaluate_run`.
    """
    out_dir = Path(out_dir)
    runs = plan_runs(variants, seeds, out_dir, extra)
    configs = [load_config(preset, run.overrides) for run in runs]
    for i, (run, cfg) in enumerate(zip(runs, configs), start=1):
        status = run.status()
        if status == "done":
            log(f"[{i}/{len(runs)}] {run.name}: evaluated already, skipped")
            continue
        log(f"[{i}/{len(runs)}] {run.name}: {'resuming' if status == 'partial' else 'training'}")
        train_fn(cfg)
        results = eval_fn(run.run_dir)
        write_eval_report(run.run_dir, results)
    preamble = describe(runs, preset or "(schema defaults)", extra)
    paths = write_ablation_report(
        out_dir, [run.run_dir for run in runs], title=title, preamble=preamble
    )
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths
