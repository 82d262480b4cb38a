"""``hjepa eval RUN_DIR``: frozen-feature kNN and linear probes of a trained run.

The same protocol runs on three feature sets, side by side: the trained target encoder (per
hierarchy level and all levels concatenated), the same architecture at its random
initialisation (the run's own seed), and raw pixels. What training added is the gap between
the first and the other two. On top of that, switched by ``eval.*`` keys:

* ``eval.low_shot``: linear probes on class-balanced 1 % / 10 % label subsets (seeds 0, 1, 2;
  mean and sample std) of the trained encoder's best features (``concat``; ``level0`` with one
  level), beside pixels when baselines are on;
* ``eval.robustness``: the best features' linear probe, fit on clean training features, on
  ``eval.robustness_limit`` corrupted test images (8 corruptions x 5 severities), with mCE
  relative to the pixel probe under the very same corruptions;
* ``eval.transfer``: kNN and linear probes of the frozen encoder on other datasets
  (``digits``, ``image_folder:PATH``).

Every subset, split and seed is fixed, so one checkpoint always gives the same numbers.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.utils.data import Dataset

import hjepa
from hjepa import checkpoint as ckpt
from hjepa.config import Config, from_stored
from hjepa.data.datasets import check_run_dataset, dataset_from_config
from hjepa.data.normalize import channel_stats
from hjepa.data.subsets import fixed_subset
from hjepa.device import pick_device
from hjepa.eval import progress, robustness_probe
from hjepa.eval.attentive import fit_attentive_probe, level_token_sets
from hjepa.eval.cache import (
    EVAL_KEYS,
    PROTOCOL_VERSION,
    BaselineCache,
    RecordedSection,
    arithmetic,
    baseline_key,
    code_digest,
    dataset_digest,
    state_digest,
)
from hjepa.eval.cache import default_dir as default_cache_dir
from hjepa.eval.collapse import collapse_report
from hjepa.eval.features import pixel_features, pixel_tokens, run_features
from hjepa.eval.knn import knn_accuracy
from hjepa.eval.linear import (
    DEFAULT_WEIGHT_DECAYS,
    LinearClassifier,
    fit_linear_classifier,
    low_shot_linear_probe,
    run_side_by_side,
)
from hjepa.eval.progress import EvalProgress
from hjepa.eval.transfer import transfer_datasets, transfer_name
from hjepa.grid import level_grid
from hjepa.models.hjepa import build_encoder
from hjepa.models.vit import VisionTransformer
from hjepa.rundir import checkpoint_path

Features = tuple[dict[str, Tensor], Tensor]


def load_run_config(
    run_dir: str | Path, overrides: Sequence[str] = (), allowed: Sequence[str] = ("eval.",)
) -> Config:
    """The run's resolved config, with ``key=value`` overrides of the keys ``allowed`` (exact or
    as a ``section.`` prefix; ``hjepa eval`` takes ``eval.*`` only): see
    :func:`hjepa.config.from_stored`."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory of hjepa train?")
    return from_stored(yaml.safe_load(path.read_text()) or {}, overrides, allowed)


def load_target_encoder(
    encoder: VisionTransformer, state: dict, source: Path, run_dir: str | Path
) -> None:
    """The checkpoint's target encoder into ``encoder`` (built from the run's config);
    :class:`ckpt.CheckpointError` when it is another architecture (a ``--checkpoint`` of
    another run)."""
    try:
        ckpt.load_module_state(encoder, state["target_encoder"])
    except (KeyError, RuntimeError) as e:
        raise ckpt.CheckpointError(
            f"{source} does not fit the model of {run_dir}/config.yaml ({e})"
        ) from e


def best_features(levels: int) -> str:
    """The feature set the extra evaluations use: all levels concatenated (or level 0 alone)."""
    return "concat" if levels > 1 else "level0"


def probe(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    cfg: Config,
    on_fit: Callable[[], None] | None = None,
) -> tuple[dict[str, float], LinearClassifier | None]:
    """kNN accuracy, and (``eval.linear``) linear-probe accuracy with its fitted classifier."""
    (xtr, ytr), (xte, yte) = train, test
    k = min(cfg.eval.knn_k, xtr.shape[0])  # tiny transfer sets have fewer than k images
    out = {
        "knn": knn_accuracy(
            xtr, ytr, xte, yte, num_classes, k=k, temperature=cfg.eval.knn_temperature
        )
    }
    classifier = None
    if cfg.eval.linear:
        classifier = fit_linear_classifier(
            xtr, ytr, num_classes, seed=cfg.train.seed, on_fit=on_fit
        )
        out["linear"] = classifier.accuracy(xte, yte)
    return out, classifier


class _Evaluator:
    """Datasets, normalisation and feature extraction of one run, and the progress bar."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        d = cfg.data
        train_set = dataset_from_config(cfg, "train")
        self.train_set = fixed_subset(train_set, cfg.eval.train_limit, seed=3)
        self.test_set = dataset_from_config(cfg, "test")
        self.channels = int(getattr(train_set, "channels", d.channels))
        self.num_classes = int(getattr(train_set, "num_classes", 0))
        self.mean, self.std = channel_stats(d.name, self.channels)
        self.progress: EvalProgress | None = None
        self.flops_per_image = 0.0

    def _advance(self, work: float) -> None:
        if self.progress is not None:
            self.progress.advance(work)

    def encoder(
        self, encoder: VisionTransformer, dataset: Dataset, tokens: dict | None = None
    ) -> Features:
        """Pooled features and labels; ``tokens`` (a dict) also gets the level tokens."""
        feats, labels = run_features(
            encoder,
            dataset,
            self.cfg,
            self.mean,
            self.std,
            self.device,
            self.cfg.train.num_workers,
            on_batch=lambda n: self._advance(n * self.flops_per_image),
            level_tokens=tokens,
        )
        # The probes run where the encoder does: L-BFGS and kNN over 60k images take
        # minutes on a CPU and seconds on a GPU.
        return feats, labels.to(self.device)

    def pixels(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        feats, labels = pixel_features(
            dataset, mean=self.mean, std=self.std, image_size=self.cfg.data.image_size
        )
        return feats.to(self.device), labels.to(self.device)

    def _fit_work(self, n: int, dim: int, num_classes: int) -> float:
        return progress.linear_flops(n, dim, num_classes, 1)

    def probe_all(
        self, train: Features, test: Features, num_classes: int
    ) -> tuple[dict[str, dict[str, float]], dict[str, LinearClassifier]]:
        """:func:`probe` of every feature set: the kNN votes one after the other (each one
        large product on all threads), then the linear fits side by side, one thread each
        (:func:`run_side_by_side`: the numbers of :func:`probe`, in less time)."""
        (tr, ytr), (te, yte) = train, test
        accs = {name: self.knn((tr[name], ytr), (te[name], yte), num_classes) for name in tr}
        if not self.cfg.eval.linear:
            return accs, {}
        n = ytr.shape[0]

        def fit(name: str) -> LinearClassifier:
            work = self._fit_work(n, tr[name].shape[1], num_classes)
            return fit_linear_classifier(
                tr[name],
                ytr,
                num_classes,
                seed=self.cfg.train.seed,
                on_fit=lambda: self._advance(work),
            )

        longest_first = sorted(tr, key=lambda name: -tr[name].shape[1])  # packs the workers
        fitted = run_side_by_side([lambda name=name: fit(name) for name in longest_first])
        classifiers = {name: dict(zip(longest_first, fitted))[name] for name in tr}
        for name, classifier in classifiers.items():
            accs[name]["linear"] = classifier.accuracy(te[name], yte)
        return accs, classifiers

    def knn(
        self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int
    ) -> dict[str, float]:
        """The kNN half of :func:`probe`, advancing the progress bar by its estimated work."""
        (xtr, ytr), (xte, yte) = train, test
        e = self.cfg.eval
        k = min(e.knn_k, xtr.shape[0])
        out = {
            "knn": knn_accuracy(xtr, ytr, xte, yte, num_classes, k=k, temperature=e.knn_temperature)
        }
        self._advance(progress.knn_flops(xtr.shape[0], xte.shape[0], xtr.shape[1]))
        return out

    def low_shot(self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]):
        """Low-shot linear probes of one feature set, keyed by the fraction as text."""
        e, (xtr, _) = self.cfg.eval, train
        # The draws run side by side, so each fit advances the bar by the mean work of one.
        works = [
            self._fit_work(round(f * xtr.shape[0]), xtr.shape[1], self.num_classes)
            for f in e.low_shot_fractions
        ]
        work = sum(works) / len(works)
        table = low_shot_linear_probe(
            *train,
            *test,
            self.num_classes,
            fractions=e.low_shot_fractions,
            seeds=e.low_shot_seeds,
            on_fit=lambda: self._advance(work),
        )
        return {f"{fraction:g}": stats for fraction, stats in table.items()}

    def attentive(
        self, train: dict[str, list[Tensor]], test: dict[str, list[Tensor]], labels: Features
    ) -> dict[str, dict[str, float]]:
        """:func:`fit_attentive_probe` of every token set, side by side, one thread each (the
        same numbers as one after the other); the probe's width and heads are the encoder's
        for every set, pixels included."""
        e, m, (ytr, yte) = self.cfg.eval, self.cfg.model, labels

        def fit(name: str) -> dict[str, float]:
            result = fit_attentive_probe(
                train[name],
                ytr,
                test[name],
                yte,
                self.num_classes,
                seed=self.cfg.train.seed,
                epochs=e.attentive_epochs,
                lrs=e.attentive_lrs,
                weight_decays=e.attentive_weight_decays,
                width=m.embed_dim,
                num_heads=m.num_heads,
            )
            self._advance(self._attentive_work([t.shape[1:] for t in train[name]]))
            return result.as_dict()

        def tokens(name: str) -> int:
            return sum(t.shape[1] for t in train[name])

        longest_first = sorted(train, key=lambda name: -tokens(name))  # packs the workers
        fitted = run_side_by_side([lambda name=name: fit(name) for name in longest_first])
        return {name: dict(zip(longest_first, fitted))[name] for name in train}

    def _attentive_work(self, shapes: list[tuple[int, int]]) -> float:
        """Estimated work of one attentive probe on token sets of ``(tokens, dim)`` shapes."""
        e, m = self.cfg.eval, self.cfg.model
        probes = len(e.attentive_lrs) * len(e.attentive_weight_decays)
        n = len(self.train_set)
        return sum(
            progress.attentive_flops(n, t, d, m.embed_dim, m.num_heads, probes, e.attentive_epochs)
            for t, d in shapes
        )

    def planned_work(self, encoder: VisionTransformer, baselines: bool) -> float:
        """Estimated FLOPs of the feature passes and probes ahead (steers the bar only)."""
        cfg, e = self.cfg, self.cfg.eval
        self.flops_per_image = progress.encoder_flops(encoder, encoder.grid_size**2)
        n_tr, n_te, classes = len(self.train_set), len(self.test_set), self.num_classes
        dim, levels = int(encoder.embed_dim), cfg.model.levels
        feature_dims = [dim] * levels + ([dim * levels] if levels > 1 else [])
        pixel_dim = self.channels * cfg.data.image_size**2
        fits = len(DEFAULT_WEIGHT_DECAYS) + 1

        def probes(dims: list[int]) -> float:
            linear = [
                progress.linear_flops(n_tr, d, classes, fits) if e.linear else 0 for d in dims
            ]
            return sum(progress.knn_flops(n_tr, n_te, d) for d in dims) + sum(linear)

        def low_shot(d: int) -> float:
            if not e.low_shot:
                return 0.0
            return sum(
                progress.linear_flops(round(f * n_tr), d, classes, fits)
                for f in e.low_shot_fractions
                for _ in e.low_shot_seeds
            )

        def attentive(shapes: list[tuple[int, int]]) -> float:
            return self._attentive_work(shapes) if e.attentive else 0.0

        cells = [(level_grid(encoder.grid_size, lvl) ** 2, dim) for lvl in range(levels)]
        level_sets = attentive(cells) * (2 if levels > 1 else 1)  # each level, then concat
        patch = self.channels * cfg.model.patch_size**2
        encoder_pass = (n_tr + n_te) * self.flops_per_image
        work = encoder_pass + probes(feature_dims) + low_shot(feature_dims[-1]) + level_sets
        if baselines:
            work += encoder_pass + probes(feature_dims) + probes([pixel_dim]) + low_shot(pixel_dim)
            work += level_sets + attentive([(encoder.grid_size**2, patch)])
        if e.robustness:
            corrupted = len(robustness_probe.CORRUPTIONS) * len(robustness_probe.SEVERITIES) + 1
            work += corrupted * (e.robustness_limit or n_te) * self.flops_per_image
        return work


def _baseline_cache(
    cfg: Config,
    ev: _Evaluator,
    random_state: dict[str, Tensor],
    architecture: dict[str, Any],
    device: torch.device,
) -> BaselineCache | None:
    """The cache entry of this run's baselines, or None with ``eval.cache=false``.

    ``architecture``: the ``model.*`` settings the encoder's constructor read."""
    e, d = cfg.eval, cfg.data
    if not e.cache:
        return None
    fields = {
        "protocol": PROTOCOL_VERSION,
        "hjepa": hjepa.__version__,
        "code": code_digest(),
        "torch": torch.__version__,
        **arithmetic(device),
        "data": {"name": d.name, "image_size": d.image_size, "channels": ev.channels},
        "train_images": dataset_digest(ev.train_set),
        "test_images": dataset_digest(ev.test_set),
        "encoder_init": state_digest(random_state),
        "architecture": architecture,
        "levels": cfg.model.levels,
        "attention": cfg.model.attention,
        "seed": cfg.train.seed,
        "eval": {k: getattr(e, k) for k in EVAL_KEYS},
    }
    directory = Path(e.cache_dir).expanduser() if e.cache_dir else default_cache_dir()
    return BaselineCache(directory, baseline_key(fields), fields)


class _Baselines:
    """Where the baselines' numbers (pixels, random init) come from in this evaluation:
    computed by it (``fresh``, then stored in the cache), read from an earlier evaluation's
    cache entry (``cached``), or nowhere (baselines off). Each stage asks :meth:`take` for its
    part, so the cache is a property of the stage that produces a number, not a branch of the
    whole pipeline."""

    def __init__(self, fresh: bool, cached: dict[str, Any] | None) -> None:
        self.fresh, self.cached = fresh, cached

    def take(self, record: dict[str, Any], name: str, compute: Callable[[], Any], *path: str):
        """``record[name]``: ``compute()`` when fresh, else the cache's value at ``path``; left
        unset when there are no baselines."""
        if self.fresh:
            record[name] = compute()
        elif self.cached is not None:
            value: Any = self.cached
            for key in path:
                value = value[key]
            record[name] = value


@dataclass
class _Run:
    """What the stages of one evaluation share (see :func:`evaluate_run`)."""

    cfg: Config
    ev: _Evaluator
    encoder: VisionTransformer
    random_state: dict[str, Tensor]
    results: dict[str, Any]
    cache: BaselineCache | None
    baselines: _Baselines
    bar: EvalProgress
    best: str
    seconds: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)
    pixel_sets: tuple[Features, Features] | None = None  # (train, test) pixels, when computed
    pixel_clf: LinearClassifier | None = None
    train: Features | None = None
    test: Features | None = None
    tokens: tuple[dict | None, dict | None] = (None, None)  # the attentive probe's level tokens
    classifiers: dict[str, LinearClassifier] = field(default_factory=dict)
    transfer_sets: dict[str, tuple[Dataset, Dataset, int]] = field(default_factory=dict)
    knn_note: str | None = None

    def lap(self, part: str) -> None:
        """Record the seconds since the last lap as ``part``'s."""
        now = time.perf_counter()
        self.seconds[part], self.clock = now - self.clock, now


def evaluate_run(
    run_dir: str | Path,
    *,
    baselines: bool | None = None,
    overrides: Sequence[str] = (),
    progress_bar: bool | None = None,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default ``RUN_DIR/checkpoints/last.pt``); write and return
    ``RUN_DIR/eval.json``, which names the checkpoint and its step.

    ``overrides`` are ``eval.*`` ``key=value`` strings on top of the run's config;
    ``baselines`` overrides ``eval.baselines`` when given. The baselines come from the cache
    of :mod:`hjepa.eval.cache` when an earlier evaluation computed them (``eval.cache``); the
    entry used is recorded as ``baseline_cache``. ``progress_bar`` (default ``run.progress``)
    shows one bar with an ETA on stderr.

    A pipeline of named stages, each switched by its ``eval.*`` key and each taking its
    baselines' numbers from :class:`_Baselines`.
    """
    run = _start(Path(run_dir), baselines, overrides, progress_bar, checkpoint)
    for stage in (_pixels, _trained, _low_shot, _attentive, _robustness, _transfer, _random_init):
        stage(run)
    run.bar.close()
    if run.knn_note:
        print(f"hjepa eval: {run.knn_note}", file=sys.stderr)
    run.results["seconds"] = run.seconds
    (Path(run_dir) / "eval.json").write_text(json.dumps(run.results, indent=2))
    return run.results


def _start(
    run_dir: Path,
    baselines: bool | None,
    overrides: Sequence[str],
    progress_bar: bool | None,
    checkpoint: str | Path | None,
) -> _Run:
    """The run's config and checkpoint, the encoder at its initialisation and trained, the
    header of ``eval.json``, the baseline cache entry and the progress bar."""
    switch = [] if baselines is None else [f"eval.baselines={str(baselines).lower()}"]
    cfg = load_run_config(run_dir, [*overrides, *switch])  # checked like any override
    source = checkpoint_path(run_dir, checkpoint)
    state = ckpt.load_checkpoint(source)
    device = pick_device(cfg.train.device)
    ev = _Evaluator(cfg, device)
    data_record = check_run_dataset(run_dir, ev.test_set)  # the folder's split as trained
    clock = time.perf_counter()
    torch.manual_seed(cfg.train.seed)  # the very initialisation the trained run started from
    architecture = RecordedSection(cfg.model)  # the model.* settings the encoder depends on
    encoder = build_encoder(architecture, cfg.data.image_size, ev.channels).to(device)
    random_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    load_target_encoder(encoder, state, source, run_dir)
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "checkpoint": str(source),
        "step": int(state["step"]),
        "eval": dict(vars(cfg.eval)),
    }
    if data_record is not None:  # an image folder: its classes and split (files: dataset.json)
        results["data"] = {k: v for k, v in data_record.items() if k != "test_files"}
    cache, source_of_baselines = _find_baselines(cfg, ev, random_state, architecture, results)
    show = cfg.run.progress if progress_bar is None else progress_bar
    ev.progress = bar = EvalProgress(ev.planned_work(encoder, source_of_baselines.fresh), show)
    best = best_features(cfg.model.levels)
    run = _Run(cfg, ev, encoder, random_state, results, cache, source_of_baselines, bar, best)
    run.clock = clock
    return run


def _find_baselines(
    cfg: Config,
    ev: _Evaluator,
    random_state: dict[str, Tensor],
    architecture: RecordedSection,
    results: dict[str, Any],
) -> tuple[BaselineCache | None, _Baselines]:
    """The cache entry (recorded in ``results``) and where the baselines' numbers come from:
    an earlier evaluation of the same data, architecture, seed and protocol, or this one. The
    entry also keeps the pixel classifier the robustness stage scores."""
    e = cfg.eval
    cache = (
        _baseline_cache(cfg, ev, random_state, architecture.read, ev.device)
        if e.baselines or e.robustness
        else None
    )
    cached = cache.load() if cache is not None and e.baselines else None
    if cache is not None:
        results["baseline_cache"] = {
            "key": cache.key,
            "dir": str(cache.dir),
            "hit": cached is not None,
            "fields": cache.fields,
        }
    fresh = e.baselines and cached is None  # baselines computed (and cached) by this call
    return cache, _Baselines(fresh, cached)


def _pixels(run: _Run) -> None:
    """Raw pixels: a baseline of the probes and the reference of mCE (whose classifier the
    cache keeps too)."""
    e, ev = run.cfg.eval, run.ev
    if e.robustness and run.cache is not None:
        saved = run.cache.load_tensors("pixel_classifier")
        run.pixel_clf = LinearClassifier.from_state(saved, ev.device) if saved else None
    if run.baselines.fresh or (e.robustness and run.pixel_clf is None):
        run.bar.stage("pixels")
        run.pixel_sets = ev.pixels(ev.train_set), ev.pixels(ev.test_set)
        run.lap("pixels")
    elif run.baselines.cached is not None:
        run.results["pixels"] = run.baselines.cached["pixels"]


def _trained(run: _Run) -> None:
    """The trained encoder's features (and level tokens), probed beside the pixels' when this
    evaluation computes the baselines (one side-by-side fit), and its collapse report."""
    e, ev, results = run.cfg.eval, run.ev, run.results
    run.bar.stage("trained encoder")
    run.tokens = ({}, {}) if e.attentive else (None, None)  # the level tokens, same pass
    run.train = ev.encoder(run.encoder, ev.train_set, run.tokens[0])
    run.test = ev.encoder(run.encoder, ev.test_set, run.tokens[1])
    run.knn_note = _record_knn_k(results["eval"], e.knn_k, int(run.train[1].shape[0]))
    if run.baselines.fresh:
        (ptr, pte), train, test = run.pixel_sets, run.train, run.test
        # The pixel probe (the largest fit) side by side with the encoder's: one probe_all
        # over both (the same labels: both passes read the datasets in order).
        if not (torch.equal(ptr[1], train[1]) and torch.equal(pte[1], test[1])):
            raise RuntimeError("pixel and encoder passes read the data in different orders")
        accs, classifiers = ev.probe_all(
            ({**train[0], "pixels": ptr[0]}, train[1]),
            ({**test[0], "pixels": pte[0]}, test[1]),
            ev.num_classes,
        )
        results["pixels"] = {"pixels": accs.pop("pixels")}
        run.pixel_clf = run.pixel_clf or classifiers.pop("pixels", None)
        classifiers.pop("pixels", None)
        results["trained"], run.classifiers = accs, classifiers
    else:
        results["trained"], run.classifiers = ev.probe_all(run.train, run.test, ev.num_classes)
    results["collapse"] = {
        name: collapse_report(feats) for name, feats in run.test[0].items() if name != "concat"
    }
    run.lap("trained")


def _low_shot(run: _Run) -> None:
    """``eval.low_shot``: linear probes on class-balanced label fractions of the best
    features, beside the pixels'."""
    if not run.cfg.eval.low_shot:
        return
    run.bar.stage("low-shot")
    ev, best = run.ev, run.best
    train_best, test_best = (run.train[0][best], run.train[1]), (run.test[0][best], run.test[1])
    entry = {"features": best, "trained": ev.low_shot(train_best, test_best)}
    run.results["low_shot"] = entry
    run.baselines.take(entry, "pixels", lambda: ev.low_shot(*run.pixel_sets), "low_shot_pixels")
    run.lap("low_shot")


def _attentive(run: _Run) -> None:
    """``eval.attentive``: the attentive probe of the level tokens, beside pixel patches as
    tokens through the same probe."""
    if not run.cfg.eval.attentive:
        return
    run.bar.stage("attentive probe")
    ev, fresh = run.ev, run.baselines.fresh
    train_sets, test_sets = (level_token_sets(t) for t in run.tokens)
    if fresh:  # pixel patches as tokens, through the same probe, side by side
        patch = run.cfg.model.patch_size
        (ptr, pte) = run.pixel_sets
        train_sets["pixels"] = [pixel_tokens(ptr[0], ev.channels, patch)]
        test_sets["pixels"] = [pixel_tokens(pte[0], ev.channels, patch)]
    trained = ev.attentive(train_sets, test_sets, (run.train[1], run.test[1]))
    entry = run.results["attentive"] = {"trained": trained}
    run.baselines.take(
        entry, "pixels", lambda: {"pixels": trained.pop("pixels")}, "attentive", "pixels"
    )
    del train_sets, test_sets
    run.tokens = (None, None)  # 1-2 GB of tokens, before the next pass
    run.lap("attentive")


def _robustness(run: _Run) -> None:
    """``eval.robustness``: the best features' probe and the pixel probe on corrupted test
    images; mCE relative to the pixels."""
    e, ev, cfg, best = run.cfg.eval, run.ev, run.cfg, run.best
    if not e.robustness:
        return
    run.bar.stage("robustness")
    clf = run.classifiers.get(best) or fit_linear_classifier(
        run.train[0][best], run.train[1], ev.num_classes, seed=cfg.train.seed
    )
    if run.pixel_clf is None:
        run.pixel_clf = fit_linear_classifier(
            *run.pixel_sets[0], ev.num_classes, seed=cfg.train.seed
        )
    if run.cache is not None:
        run.cache.store_tensors("pixel_classifier", run.pixel_clf.state())
    clean = robustness_probe.materialize(ev.test_set, e.robustness_limit)
    clean_acc, table = robustness_probe.accuracy_table(
        {
            "encoder": lambda ds: ev.encoder(run.encoder, ds)[0][best],
            "pixels": lambda ds: ev.pixels(ds)[0],
        },
        {"encoder": clf, "pixels": run.pixel_clf},
        clean,
    )
    run.results["robustness"] = {
        "features": best,
        "images": len(clean),
        **robustness_probe.summarize(clean_acc, table, "encoder", "pixels"),
    }
    run.lap("robustness")


def _transfer(run: _Run) -> None:
    """``eval.transfer``: the frozen encoder's probes on other datasets, beside pixels."""
    for spec in run.cfg.eval.transfer:
        _transfer_one(run, spec)
    if run.cfg.eval.transfer:
        run.lap("transfer")


def _transfer_one(run: _Run, spec: str) -> None:
    e, ev = run.cfg.eval, run.ev
    name = transfer_name(spec)
    run.bar.stage(f"transfer {name}")
    tr_set, te_set = transfer_datasets(
        spec, image_size=run.cfg.data.image_size, channels=ev.channels
    )
    num_classes = int(getattr(tr_set, "num_classes", 0))
    run.transfer_sets[spec] = (tr_set, te_set, num_classes)
    entry = {"spec": spec, "train_images": len(tr_set), "test_images": len(te_set)}
    tr_feats = ev.encoder(run.encoder, tr_set)
    entry["knn_k"] = min(e.knn_k, int(tr_feats[1].shape[0]))  # the k its probes used
    te_feats = ev.encoder(run.encoder, te_set)
    entry["trained"] = ev.probe_all(tr_feats, te_feats, num_classes)[0]

    def pixels() -> dict:
        sets = [({"pixels": f}, y) for f, y in (ev.pixels(tr_set), ev.pixels(te_set))]
        return ev.probe_all(*sets, num_classes)[0]

    run.baselines.take(entry, "pixels", pixels, "transfer", name, "pixels")
    run.results.setdefault("transfer", {})[name] = entry


def _random_init(run: _Run) -> None:
    """The same probes of the encoder at its initialisation (computed, then the whole
    baseline entry stored in the cache; or read from it)."""
    e, ev, results, fresh = run.cfg.eval, run.ev, run.results, run.baselines.fresh
    init_tokens: tuple = (None, None)
    init_train = init_test = None  # the probes below read them only when fresh
    if fresh:
        run.bar.stage("random-init encoder")
        run.encoder.load_state_dict(run.random_state)
        init_tokens = ({}, {}) if e.attentive else (None, None)
        init_train = ev.encoder(run.encoder, ev.train_set, init_tokens[0])
        init_test = ev.encoder(run.encoder, ev.test_set, init_tokens[1])
    probe = lambda: ev.probe_all(init_train, init_test, ev.num_classes)[0]
    run.baselines.take(results, "random_init", probe, "random_init")
    if e.attentive:
        sets = lambda: [level_token_sets(t) for t in init_tokens]
        attentive = lambda: ev.attentive(*sets(), (init_train[1], init_test[1]))
        run.baselines.take(
            results["attentive"], "random_init", attentive, "attentive", "random_init"
        )
    for spec, (tr_set, te_set, num_classes) in run.transfer_sets.items():
        name = transfer_name(spec)
        transfer = lambda tr=tr_set, te=te_set, n=num_classes: ev.probe_all(
            ev.encoder(run.encoder, tr), ev.encoder(run.encoder, te), n
        )[0]
        run.baselines.take(
            results["transfer"][name], "random_init", transfer, "transfer", name, "random_init"
        )
    if fresh:
        run.lap("random_init")
        if run.cache is not None:
            run.cache.store(_baseline_results(results))


def _record_knn_k(record: dict[str, Any], k: int, train_images: int) -> str | None:
    """The kNN probes use at most as many neighbours as there are training images: record the
    k they used (and the one asked for) and return the note that says so, or None."""
    if k <= train_images:
        return None
    record["knn_k"], record["knn_k_requested"] = train_images, k
    return (
        f"eval.knn_k={k} exceeds the {train_images} training images: the kNN probes used "
        f"k={train_images} (recorded in eval.json)"
    )


def _baseline_results(results: dict[str, Any]) -> dict[str, Any]:
    """The part of ``results`` the baseline cache holds."""
    return {
        "pixels": results["pixels"],
        "random_init": results["random_init"],
        "low_shot_pixels": results.get("low_shot", {}).get("pixels"),
        "attentive": {
            k: v for k, v in results.get("attentive", {}).items() if k in ("pixels", "random_init")
        },
        "transfer": {
            name: {"pixels": entry["pixels"], "random_init": entry["random_init"]}
            for name, entry in results.get("transfer", {}).items()
        },
    }


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(results: dict[str, Any]) -> str:
    """Plain-text summary printed by ``hjepa eval`` (Markdown tables, readable in a terminal)."""
    rows = []
    for group in ("trained", "random_init", "pixels"):
        for name, accs in results.get(group, {}).items():
            rows.append(
                f"| {group:<11} | {name:<7} | {accs['knn']:.4f} | {_acc(accs.get('linear')):>6} |"
            )
    header = (
        "| encoder     | feature | kNN    | linear |\n|-------------|---------|--------|--------|"
    )
    lines = [header, *rows]
    collapsed = [n for n, r in results.get("collapse", {}).items() if r["collapsed"]]
    if collapsed:
        lines.append(f"WARNING: collapsed features at {', '.join(collapsed)}")
    low = results.get("low_shot")
    if low:
        for model in ("trained", "pixels"):
            for fraction, s in low.get(model, {}).items():
                lines.append(
                    f"low-shot {model} {low['features'] if model == 'trained' else 'pixels'} "
                    f"{float(fraction):.0%} labels: {s['mean']:.4f} ± {s['std']:.4f}"
                )
    rob = results.get("robustness")
    if rob:
        mca = rob["mean_corruption_accuracy"]
        mce = "undefined" if rob["mce"] is None else f"{rob['mce']:.3f}"
        lines.append(
            f"robustness ({rob['images']} images): clean {rob['clean']['encoder']:.4f}, "
            f"mean corruption accuracy {mca['encoder']:.4f} (pixels {mca['pixels']:.4f}), "
            f"mCE vs pixels {mce}"
        )
    for name, entry in results.get("transfer", {}).items():
        for group in ("trained", "random_init", "pixels"):
            for feat, accs in entry.get(group, {}).items():
                lines.append(
                    f"transfer {name} {group} {feat}: kNN {accs['knn']:.4f} "
                    f"linear {_acc(accs.get('linear'))}"
                )
    for group, table in results.get("attentive", {}).items():
        for feat, fit in table.items():
            lines.append(f"attentive {group} {feat}: {fit['accuracy']:.4f}")
    return "\n".join(lines)
