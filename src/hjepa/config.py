"""Typed configuration: one schema, packaged YAML presets and ``key=value`` overrides.

Each key is defined once, in the dataclasses below: its type (``Literal`` for a choice), its
default, its bounds and a one-line description. Everything else reads them from there: the
choices other modules accept (:data:`CHOICES`), the lower bounds (:data:`MINIMUM`), the checks in
:func:`validate`, ``hjepa config --list`` and docs/config.md. An unknown or mistyped key is an
error that names the closest valid key, and every value is coerced to the schema's type (or
refused), so a config that loads is a config whose every option does something.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from hjepa.grid import grid_side, max_levels


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


# -- how a key is declared ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """An interval a number (or every number of a list) must lie in; ``None``: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the low end itself is excluded
    high_open: bool = False
    what: str = ""  # what the number is, for the message: "a probability"

    def holds(self, v: float) -> bool:
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.low is None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = (
                f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                f"{_num(self.high)}{')' if self.high_open else ']'}"
            )
        return f"{self.what} {text}" if self.what else text


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Mode:
    """A setting some keys act under; outside it nothing reads them, so :func:`validate` refuses
    a non-default value of such a key (``setting(..., when=MODE)``) rather than run without it.

    ``active(cfg)``: whether the mode is on; ``state(cfg)``: the settings that have it off, as
    the refusal names them; ``fix``: how to turn it on; ``off``/``on``: ``key=value`` overrides
    that turn it off and on (tests/test_modes.py derives its cases from them).
    """

    active: Callable[[Config], bool]
    state: Callable[[Config], str]
    fix: str
    off: tuple[str, ...]
    on: tuple[str, ...] = ()


def _terms(cfg: Config) -> list[str]:
    return cfg.loss.regularizer.split("+")


EMA_TARGET = Mode(
    lambda c: c.model.target == "ema",
    lambda c: f"model.target={c.model.target}",
    "use model.target=ema",
    off=("model.target=shared", "loss.regularizer=sigreg"),
)
SHARED_TARGET = Mode(
    lambda c: c.model.target == "shared",
    lambda c: f"model.target={c.model.target}",
    "use model.target=shared with a regularizer",
    off=(),
    on=("model.target=shared", "loss.regularizer=sigreg"),
)
TOKEN_SIGREG = Mode(
    lambda c: "sigreg" in _terms(c),
    lambda c: f"loss.regularizer={c.loss.regularizer}",
    "choose loss.regularizer=sigreg or sigreg+vicreg",
    off=("loss.regularizer=none",),
    on=("loss.regularizer=sigreg",),
)
ANY_SIGREG = Mode(  # the token SIGReg or the view-level one (loss.view_sigreg)
    lambda c: "sigreg" in _terms(c) or c.loss.view_sigreg > 0,
    lambda c: f"loss.regularizer={c.loss.regularizer} and loss.view_sigreg=0",
    "choose loss.regularizer=sigreg or sigreg+vicreg",
    off=("loss.regularizer=none",),
    on=("loss.regularizer=sigreg",),
)
VICREG = Mode(
    lambda c: "vicreg" in _terms(c),
    lambda c: f"loss.regularizer={c.loss.regularizer}",
    "choose loss.regularizer=vicreg or sigreg+vicreg",
    off=("loss.regularizer=sigreg",),
    on=("loss.regularizer=sigreg+vicreg",),
)
CONTRAST = Mode(
    lambda c: c.loss.contrastive,
    lambda c: "loss.contrastive=false",
    "set loss.contrastive=true",
    off=("loss.contrastive=false",),
    on=("loss.contrastive=true",),
)
MULTICROP = Mode(
    lambda c: c.data.multicrop.num_local > 0,
    lambda c: "data.multicrop.num_local=0",
    "set data.multicrop.num_local >= 1",
    off=("data.multicrop.num_local=0",),
    on=("data.multicrop.num_local=1",),
)
THREE_AUGMENT = Mode(
    lambda c: c.data.augment.three_augment > 0,
    lambda c: "data.augment.three_augment=0",
    "set data.augment.three_augment > 0 (its blur draws this sigma)",
    off=("data.augment.three_augment=0",),
    on=("data.augment.three_augment=0.5",),
)
WARMUP = Mode(
    lambda c: c.optim.warmup_steps > 0 or c.optim.warmup_fraction > 0,
    lambda c: "optim.warmup_steps=0 and optim.warmup_fraction=0",
    "give the run a warmup (optim.warmup_steps or optim.warmup_fraction)",
    off=("optim.warmup_steps=0", "optim.warmup_fraction=0"),
)
WARMUP_BY_FRACTION = Mode(
    lambda c: c.optim.warmup_steps == 0,
    lambda c: f"optim.warmup_steps={c.optim.warmup_steps}",
    "set optim.warmup_steps=0",
    off=("optim.warmup_steps=10",),
)
SYNTHETIC = Mode(
    lambda c: c.data.name == "synthetic",
    lambda c: f"data.name={c.data.name}",
    "use data.name=synthetic",
    off=("data.name=fashion_mnist",),
    on=("data.name=synthetic",),
)
FILES = Mode(  # datasets read from a folder (synthetic images are generated)
    lambda c: c.data.name != "synthetic",
    lambda c: f"data.name={c.data.name}",
    "use a dataset read from files",
    off=("data.name=synthetic",),
    on=("data.name=fashion_mnist",),
)
IMAGE_FOLDER = Mode(
    lambda c: c.data.name == "image_folder",
    lambda c: f"data.name={c.data.name} (which has its own test split)",
    "use data.name=image_folder",
    off=("data.name=fashion_mnist",),
    on=("data.name=image_folder",),
)


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    what: str = "",
    pair: bool = False,
    nonempty: bool = False,
    refusal: str = "",
    when: Mode | None = None,
) -> Any:
    """A schema field: ``default``, a one-line ``help``, and what a value must satisfy.

    ``ge``/``gt``/``le``/``lt``: bounds (of every entry, for a list); ``pair``: a
    ``[min, max]`` range, ``min <= max``, both within the bounds; ``nonempty``: a string or list
    that may not be empty; ``refusal``: the message when the bounds fail, where the generic one
    would not say enough; ``when``: the :class:`Mode` the key acts in (None: every mode).
    """
    low, high = (gt if ge is None else ge), (lt if le is None else le)
    bounds = None
    if low is not None or high is not None:
        bounds = Bounds(
            low, high, ge is None and gt is not None, le is None and lt is not None, what
        )
    meta = {
        "help": help,
        "bounds": bounds,
        "pair": pair,
        "nonempty": nonempty,
        "refusal": refusal,
        "when": when,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def probability(default: float, help: str, when: Mode | None = None) -> Any:
    return setting(default, help, ge=0.0, le=1.0, what="a probability", when=when)


# -- the schema --------------------------------------------------------------------------------

Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DatasetName = Literal["fashion_mnist", "cifar10", "cifar100", "image_folder", "synthetic"]
Attention = Literal["auto", "math", "efficient", "flash", "cudnn"]
Regularizer = Literal["none", "sigreg", "vicreg", "sigreg+vicreg"]


@dataclass
class RunConfig:
    dir: str = setting(
        "runs/default",
        "folder of the run: config, metrics, checkpoints, eval",
        nonempty=True,
        refusal="run.dir is empty: name the folder the run writes to, e.g. run.dir=runs/mine",
    )
    checkpoint_every: int = setting(
        200, "optimizer steps between rewrites of checkpoints/last.pt", ge=1
    )
    keep_every: int = setting(
        0, "optimizer steps between periodic checkpoints kept beside last.pt (0: none)", ge=0
    )
    tensorboard: bool = setting(True, "also write TensorBoard event files into the run folder")
    progress: bool = setting(True, "show a progress bar on stderr")


@dataclass
class TrainConfig:
    seed: int = setting(0, "seed of model init, data order, masks and augmentations")
    epochs: int = setting(10, "passes over the training set (used when max_steps is 0)", ge=0)
    max_steps: int = setting(0, "optimizer steps of the whole run; overrides epochs when > 0", ge=0)
    stop_after: int = setting(
        0,
        "end this invocation after that many steps; the schedule stays the full run's (0: off)",
        ge=0,
    )
    batch_size: int = setting(
        128, "global batch per optimizer step, split over ranks and accumulation steps", ge=1
    )
    accum_steps: int = setting(1, "micro-batches accumulated per optimizer step", ge=1)
    grad_clip: float = setting(1.0, "largest global gradient norm (0: no clipping)", ge=0.0)
    ema_start: float = setting(
        0.996,
        "target-encoder EMA momentum at the first step",
        ge=0.0,
        le=1.0,
        when=EMA_TARGET,
    )
    ema_end: float = setting(
        1.0,
        "EMA momentum at the last step (linear in between)",
        ge=0.0,
        le=1.0,
        when=EMA_TARGET,
    )
    ema_timing: Literal["after_step", "before_step"] = setting(
        "after_step",
        "after_step: EMA after optimizer.step; before_step: before it, an ablation (train/ema.py)",
        when=EMA_TARGET,
    )
    log_every: int = setting(
        20, "optimizer steps between training-loss records in metrics.jsonl", ge=1
    )
    knn_every: int = setting(
        0, "optimizer steps between online kNN probes (0: only at the end)", ge=0
    )
    knn_bank_size: int = setting(5000, "train images in the online kNN memory bank", ge=0)
    knn_query_size: int = setting(1000, "held-out test images the online kNN classifies", ge=0)
    device: Device = setting("auto", "where to train (auto: cuda, then mps, then cpu)")
    precision: Precision = setting(
        "auto", "training precision (auto: bf16 on CUDA, fp32 elsewhere)"
    )
    num_workers: int = setting(
        0, "data-loader worker processes for datasets decoded from files", ge=0
    )
    threads: int = setting(0, "torch intra-op threads on CPU (0: PyTorch's default)", ge=0)
    nonfinite: Literal["stop", "skip"] = setting(
        "stop", "on a NaN/inf loss or gradient: stop (last checkpoint kept) or skip the step"
    )
    compile: bool = setting(
        False, "torch.compile the encoders and the predictor (faster steps on a GPU)"
    )
    init_from: str = setting(
        "", "a new run starts from this run dir's (or checkpoint file's) encoder weights"
    )


@dataclass
class OptimConfig:
    lr: float = setting(1e-3, "peak learning rate of AdamW, reached at the end of warmup", gt=0.0)
    start_lr: float = setting(
        2e-4,
        "learning rate at the first step (linear warmup from it)",
        ge=0.0,
        when=WARMUP,
    )
    final_lr: float = setting(1e-6, "learning rate at the last step (cosine decay to it)", ge=0.0)
    warmup_steps: int = setting(
        0, "optimizer steps of warmup (0: warmup_fraction of the run)", ge=0
    )
    warmup_fraction: float = setting(
        0.05,
        "fraction of the run spent in warmup when warmup_steps is 0",
        ge=0.0,
        le=1.0,
        when=WARMUP_BY_FRACTION,
    )
    weight_decay: float = setting(0.04, "weight decay at the first step (cosine schedule)", ge=0.0)
    final_weight_decay: float = setting(0.4, "weight decay at the last step", ge=0.0)
    betas: list[float] = setting([0.9, 0.999], "AdamW's two moment coefficients", ge=0.0, lt=1.0)


@dataclass
class AugmentConfig:
    """DeiT III style batched augmentations on top of the crop + flip (all off by default)."""

    three_augment: float = probability(
        0.0, "chance per image of one of grayscale, solarize or blur"
    )
    blur_sigma: list[float] = setting(
        [0.1, 2.0],
        "range of the blur's Gaussian sigma, in pixels",
        ge=1e-3,
        le=100.0,
        pair=True,
        when=THREE_AUGMENT,
    )
    color_jitter: float = setting(
        0.0,
        "brightness/contrast (+ saturation on RGB) factors drawn in 1 +- s (0: off)",
        ge=0.0,
        lt=1.0,
        what="a strength",
    )
    mixup: float = setting(0.0, "mixup's Beta(a, a) concentration (0: off)", ge=0.0)
    cutmix: float = setting(
        0.0, "CutMix's Beta(a, a) concentration (0: off; with mixup: one of them per batch)", ge=0.0
    )
    random_erasing: float = probability(0.0, "chance per image of erasing one random box")


@dataclass
class MultiCropConfig:
    """Extra local crops whose pooled context embedding predicts the global pooled target."""

    num_local: int = setting(0, "local crops per image (0: no multi-crop)", ge=0)
    local_size: int = setting(
        16,
        "side of a local crop in pixels, a multiple of model.patch_size",
        ge=1,
        when=MULTICROP,
    )
    local_scale: list[float] = setting(
        [0.05, 0.4],
        "range of a local crop's area as a fraction of the image",
        ge=1e-3,
        le=1.0,
        pair=True,
        when=MULTICROP,
    )
    weight: float = setting(
        1.0,
        "weight of the local-to-global prediction term in the loss",
        ge=0.0,
        when=MULTICROP,
    )


@dataclass
class DataConfig:
    name: DatasetName = setting("fashion_mnist", "dataset to train on")
    root: str = setting(
        "", "folder holding the dataset ('': the dataset's default locations)", when=FILES
    )
    image_size: int = setting(28, "side of the square images the model sees, in pixels", ge=1)
    channels: int = setting(
        0,
        "image channels (0: follow the data: image_folder's files, synthetic's 1, a dataset's own)",
        ge=0,
    )
    synthetic_size: int = setting(
        2048,
        "training images of 'synthetic' (its test split has a quarter)",
        ge=1,
        when=SYNTHETIC,
    )
    class_subset: str = setting(
        "",
        "image_folder only: 'imagenet100' or a file of class folder names",
        when=IMAGE_FOLDER,
    )
    val_fraction: float = setting(
        0.1,
        "image_folder without val/: share of each class held out as the test split",
        gt=0.0,
        le=0.5,
        when=IMAGE_FOLDER,
    )
    crop_scale: list[float] = setting(
        [0.3, 1.0],
        "range of the random crop's area as a fraction of the image",
        ge=1e-3,
        le=1.0,
        pair=True,
    )
    crop_ratio: list[float] = setting(
        [0.75, 1.3333333], "range of the random crop's aspect ratio", ge=1e-2, le=1e2, pair=True
    )
    hflip: float = probability(0.5, "chance of a horizontal flip per image")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)


@dataclass
class ModelConfig:
    patch_size: int = setting(4, "side of a patch (one token) in pixels", ge=1)
    stem: Literal["patch", "conv", "deepconv", "convpool"] = setting(
        "patch",
        "patch: a linear map per patch; conv, deepconv, convpool: conv stacks (encoder_options.md)",
    )
    embed_dim: int = setting(
        192, "token width of the encoders, a multiple of 4 and of num_heads", ge=4
    )
    depth: int = setting(6, "transformer blocks of each encoder", ge=1)
    num_heads: int = setting(3, "attention heads of the encoders", ge=1)
    mlp_ratio: float = setting(4.0, "MLP hidden width over token width, in every block", gt=0.0)
    predictor_embed_dim: int = setting(
        96, "token width of the predictor, a multiple of 4 and of its heads", ge=4
    )
    predictor_depth: int = setting(4, "transformer blocks of the predictor", ge=1)
    predictor_num_heads: int = setting(3, "attention heads of the predictor", ge=1)
    levels: int = setting(
        3, "hierarchy levels predicted: the token grid pooled by 1, 2, 4, 8", ge=1, le=4
    )
    drop_path: float = setting(
        0.0,
        "stochastic-depth rate of the last block of every stack (linear from 0)",
        ge=0.0,
        lt=1.0,
    )
    normalize_targets: bool = setting(
        False, "also L2-normalise targets and predictions (after the layer norm)"
    )
    predictor_mode: Literal["repeat", "shared"] = setting(
        "shared",
        "shared: one predictor pass for all blocks; repeat: one per block (I-JEPA) (docs/scale.md)",
    )
    attention: Attention = setting("auto", "scaled-dot-product attention kernel used in training")
    pos_embed: Literal["sincos", "rope"] = setting(
        "sincos", "positions: sincos added to the tokens, or rope (axial 2D RoPE in attention)"
    )
    layer_scale: float = setting(
        0.0,
        "LayerScale's initial gain on every residual branch (0: off)",
        ge=0.0,
        what="an initial gain",
    )
    grad_checkpointing: bool = setting(
        False, "recompute each block in the backward pass (less memory, slower)"
    )
    fpn: Literal["none", "add", "concat"] = setting(
        "none", "top-down pathway over the level predictions and how it fuses them"
    )
    target: Literal["ema", "shared"] = setting(
        "ema",
        "targets from an EMA copy of the encoder, or from the encoder itself (needs a regulariser)",
    )
    target_stop_grad: bool = setting(
        True, "with target=shared: the targets carry no gradient", when=SHARED_TARGET
    )


@dataclass
class MaskingConfig:
    num_targets: int = setting(4, "target blocks per image", ge=1)
    target_scale: list[float] = setting(
        [0.15, 0.2],
        "range of a target block's area as a fraction of the image",
        ge=1e-6,
        le=1.0,
        pair=True,
    )
    target_aspect: list[float] = setting(
        [0.75, 1.5], "range of a target block's height/width ratio", ge=1e-3, le=1e3, pair=True
    )
    context_scale: list[float] = setting(
        [0.85, 1.0],
        "range of the context square's area before the targets are cut out",
        ge=1e-6,
        le=1.0,
        pair=True,
    )
    scale_mode: Literal["constant", "gentle", "geometric"] = setting(
        "constant",
        "constant: all levels reuse the level-0 targets; gentle, geometric: data/footprints.py",
    )
    min_context: int = setting(4, "fewest context tokens a mask may leave; fewer are redrawn", ge=1)


@dataclass
class LossConfig:
    distance: Literal["mse", "smooth_l1"] = setting("mse", "distance between prediction and target")
    level_weights: list[float] = setting(
        [], "weight of each level's loss ([]: 1.0, 0.7, 0.5, 0.35 for the first levels)", ge=0.0
    )
    regularizer: Regularizer = setting("none", "anti-collapse term (docs/regularizers.md)")
    regularize_on: Literal["context", "predictor", "pooled"] = setting(
        "context",
        "what SIGReg sees: context tokens, predictions or level-pooled context",
        when=TOKEN_SIGREG,
    )
    sigreg_weight: float = setting(0.05, "weight of SIGReg in the loss", ge=0.0, when=TOKEN_SIGREG)
    sigreg_slices: int = setting(
        1024, "random directions SIGReg projects on each step", ge=1, when=ANY_SIGREG
    )
    sigreg_draw: Literal["gaussian", "permuted"] = setting(
        "gaussian",
        "SIGReg's directions: fresh Gaussian, or one Gaussian set signed-permuted per step",
        when=ANY_SIGREG,
    )
    sigreg_eval: Literal["table", "powers"] = setting(
        "table",
        "SIGReg's cos/sin of t_j x: 16 cosines, or 4 and complex products (faster, other rounding)",
        when=ANY_SIGREG,
    )
    view_sigreg: float = setting(
        0.0,
        "weight of SIGReg on each view's pooled embedding (needs multi-crop; 0: off)",
        ge=0.0,
        when=MULTICROP,
    )
    vicreg_weight: float = setting(
        0.1,
        "weight of the VICReg term (its three parts weighted below)",
        ge=0.0,
        when=VICREG,
    )
    vicreg_var_weight: float = setting(25.0, "VICReg's variance coefficient", ge=0.0, when=VICREG)
    vicreg_cov_weight: float = setting(1.0, "VICReg's covariance coefficient", ge=0.0, when=VICREG)
    vicreg_inv_weight: float = setting(
        25.0,
        "VICReg's invariance coefficient (between two views)",
        ge=0.0,
        when=VICREG,
    )
    contrastive: bool = setting(False, "C-JEPA: NT-Xent between the pooled embeddings of two views")
    contrastive_weight: float = setting(
        0.1, "weight of the contrastive term", ge=0.0, when=CONTRAST
    )
    contrastive_temperature: float = setting(
        0.1,
        "NT-Xent temperature",
        gt=0.0,
        refusal="loss.contrastive_temperature must be > 0, e.g. 0.1",
        when=CONTRAST,
    )
    contrastive_hidden_dim: int = setting(
        512,
        "hidden width of the contrastive projection head",
        ge=1,
        when=CONTRAST,
    )
    contrastive_out_dim: int = setting(
        128, "output width of the contrastive projection head", ge=1, when=CONTRAST
    )


@dataclass
class EvalConfig:
    knn_k: int = setting(20, "neighbours of the kNN probe", ge=1)
    knn_temperature: float = setting(
        0.07, "temperature of the kNN probe's similarity weights", gt=0.0
    )
    batch_size: int = setting(512, "images per batch when extracting features", ge=1)
    train_limit: int = setting(0, "train images the probes use (0: all)", ge=0)
    linear: bool = setting(True, "fit a linear probe besides the kNN")
    baselines: bool = setting(True, "also probe raw pixels and a randomly initialised encoder")
    low_shot: bool = setting(True, "linear probes on class-balanced fractions of the labels")
    low_shot_fractions: list[float] = setting(
        [0.01, 0.1], "label fractions of the low-shot probes", gt=0.0, le=1.0, nonempty=True
    )
    low_shot_seeds: list[int] = setting(
        [0, 1, 2], "seeds of the low-shot label draws", nonempty=True
    )
    attentive: bool = setting(
        True, "attentive probe (V-JEPA: a learned query cross-attends to the frozen tokens)"
    )
    attentive_epochs: int = setting(4, "epochs of every attentive probe", ge=1)
    attentive_lrs: list[float] = setting(
        [1e-3, 3e-3], "AdamW learning rates the attentive probe chooses from", gt=0.0, nonempty=True
    )
    attentive_weight_decays: list[float] = setting(
        [0.01, 0.1], "AdamW weight decays the attentive probe chooses from", ge=0.0, nonempty=True
    )
    robustness: bool = setting(True, "probe a corrupted test set (8 corruptions x 5 severities)")
    robustness_limit: int = setting(2000, "test images corrupted (0: the whole test set)", ge=0)
    transfer: list[str] = setting([], "other datasets to probe: 'digits' or 'image_folder:PATH'")
    cache: bool = setting(
        True, "reuse the baselines (pixels, random init) from a cache of earlier evaluations"
    )
    cache_dir: str = setting("", "folder of that cache ('': $HJEPA_CACHE_DIR or ~/.cache/hjepa)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_LEVEL_WEIGHTS = (1.0, 0.7, 0.5, 0.35)
#: Datasets whose images have a fixed channel count: data.channels may be 0 or that count.
NATIVE_CHANNELS = {"fashion_mnist": 1, "cifar10": 3, "cifar100": 3}
#: Largest token grid side (65 536 tokens an image): far past what attention holds, and the
#: mask checks below take time quadratic in the side.
MAX_GRID = 256


# -- reading the schema ------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One setting as the schema defines it."""

    name: str  # dotted: "data.augment.mixup"
    type: Any  # int, float, bool, str, list[...] or Literal[...]
    default: Any
    help: str
    bounds: Bounds | None
    pair: bool
    nonempty: bool
    refusal: str
    when: Mode | None

    @property
    def choices(self) -> tuple[str, ...]:
        return typing.get_args(self.type) if typing.get_origin(self.type) is Literal else ()


def _schema_keys(cls: type, prefix: str = "") -> list[Key]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):  # a section or a nested group (data.augment)
            keys += _schema_keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        keys.append(Key(f"{prefix}{f.name}", tp, default, **f.metadata))
    return keys


SCHEMA: dict[str, Key] = {k.name: k for k in _schema_keys(Config)}

# The accepted values of every choice key; modules that take one import it from here.
CHOICES: dict[str, tuple[str, ...]] = {k: key.choices for k, key in SCHEMA.items() if key.choices}

# Lower bounds of numeric settings: below them a run would divide by zero, build an empty
# layer or silently do nothing (reliability fuzzing, tests/test_validation_fuzz.py).
MINIMUM: dict[str, float] = {
    k: key.bounds.low
    for k, key in SCHEMA.items()
    if key.type in (int, float)
    and key.bounds
    and key.bounds.low is not None
    and not key.bounds.low_open
}


def valid_keys() -> list[str]:
    """Every dotted key of the schema, in its order."""
    return list(SCHEMA)


def get_value(cfg: Config, key: str) -> Any:
    """The value of a dotted key, e.g. ``get_value(cfg, "data.augment.mixup")``."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


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


def level_weights(cfg: Config) -> list[float]:
    return list(cfg.loss.level_weights) or list(DEFAULT_LEVEL_WEIGHTS[: cfg.model.levels])


def _check_key(cfg: Config, key: Key) -> None:
    """The rules the schema gives ``key``: finite numbers, bounds, ranges, non-empty."""
    value = get_value(cfg, key.name)
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        raise ConfigError(f"{key.name}={value} must be a finite number")
    refuse = lambda text: ConfigError(key.refusal or text)
    if key.nonempty and not (value.strip() if isinstance(value, str) else value):
        raise refuse(f"{key.name} is empty: give it a value ({key.help})")
    b = key.bounds
    if key.pair:
        if len(value) != 2 or value[0] > value[1] or not all(b.holds(v) for v in value):
            raise refuse(
                f"{key.name} must be [min, max] with {_num(b.low)} <= min <= max <= "
                f"{_num(b.high)}, got {value}"
            )
    elif b is not None and not all(b.holds(v) for v in items):
        if isinstance(value, list):
            raise refuse(f"{key.name}={value}: every entry must be {b}")
        raise refuse(f"{key.name}={value} must be {b}")


def _check_numbers(cfg: Config, stored: bool = False) -> None:
    """Each key against its schema rules, then the numbers that constrain one another."""
    for key in SCHEMA.values():
        if not (stored and key.name == "run.dir"):  # a card clears it (see from_dict)
            _check_key(cfg, key)
    m, o = cfg.model, cfg.optim
    if int(m.embed_dim * m.mlp_ratio) < 1:
        raise ConfigError(f"model.mlp_ratio={m.mlp_ratio} must give an MLP of at least 1 unit")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas={o.betas} must be a pair, e.g. [0.9, 0.999]")


def _block_side(area: float, grid: int) -> int:
    """Side of a mask block as the sampler rounds it (data/masks.py, ``_block_size``)."""
    return min(max(round(math.sqrt(area)), 1), grid)


def _row_cover(grid: int, side: int) -> list[float]:
    """Per row of a ``grid``-row grid: the chance that a block of ``side`` rows, its top row
    uniform over the ``grid - side + 1`` offsets (as the sampler places it), covers that row."""
    offsets = grid - side + 1
    return [(min(r, grid - side) - max(0, r - side + 1) + 1) / offsets for r in range(grid)]


def expected_context(cfg: Config) -> float:
    """Context tokens a mask draw leaves on average, in the most favourable case the settings
    allow: the largest context square and ``masking.num_targets`` level-0 target blocks of the
    smallest scale, all placed uniformly at random (other scale modes hide more, never less).
    """
    mk, grid = cfg.masking, grid_side(cfg.data.image_size, cfg.model.patch_size)
    n, best = grid * grid, 0.0
    c = _block_side(mk.context_scale[1] * n, grid)
    in_context = _row_cover(grid, c)
    lo, hi = mk.target_aspect
    for aspect in {lo, hi, min(max(1.0, lo), hi)}:
        area = mk.target_scale[0] * n
        rows = _row_cover(grid, _block_side(area * aspect, grid))
        cols = _row_cover(grid, _block_side(area / aspect, grid))
        left = sum(
            in_context[r] * in_context[k] * (1.0 - rows[r] * cols[k]) ** mk.num_targets
            for r in range(grid)
            for k in range(grid)
        )
        best = max(best, left)
    return best


def _check_masks_feasible(cfg: Config) -> None:
    """Refuse mask settings that leave no room for a context. First the settings no draw can
    satisfy: even with the largest context square and the smallest target block pushed into
    the opposite corner, fewer than ``min_context`` tokens would be left. Then those whose
    draws leave fewer than ``min_context`` on average (:func:`expected_context`): all target
    blocks together cover the context, and the sampler would redraw nearly every sample.

    A ``h x w`` block and a ``c x c`` square in a ``G x G`` grid overlap in at least
    ``max(0, h + c - G) * max(0, w + c - G)`` tokens.
    """
    mk, grid = cfg.masking, grid_side(cfg.data.image_size, cfg.model.patch_size)
    n = grid * grid
    if mk.min_context > n:
        raise ConfigError(
            f"masking.min_context={mk.min_context} exceeds the {grid}x{grid}={n} token grid"
        )
    (s_lo, _), (a_lo, a_hi) = mk.target_scale, mk.target_aspect
    h_min = _block_side(s_lo * n * a_lo, grid)  # smallest height any target block can have
    w_min = _block_side(s_lo * n / a_hi, grid)  # smallest width
    c_lo, c_hi = (_block_side(s * n, grid) for s in mk.context_scale)
    best = max(
        c * c - max(0, h_min + c - grid) * max(0, w_min + c - grid) for c in range(c_lo, c_hi + 1)
    )
    if best < mk.min_context:
        raise ConfigError(
            f"masking.min_context={mk.min_context} cannot be met on a {grid}x{grid} token grid "
            f"(at most {best} context tokens survive the target blocks): lower "
            "masking.min_context or masking.target_scale, or raise masking.context_scale"
        )
    left = expected_context(cfg)
    if left < mk.min_context:
        raise ConfigError(
            f"masks leave fewer than min_context={mk.min_context} context tokens on a "
            f"{grid}x{grid} token grid on average (about {left:.1f} survive "
            f"masking.num_targets={mk.num_targets} blocks of masking.target_scale="
            f"{mk.target_scale}): lower masking.num_targets or masking.target_scale, or raise "
            "masking.context_scale"
        )


def validate(cfg: Config, *, stored: bool = False, presets: dict[str, Any] | None = None) -> None:
    """Refuse contradictory or impossible settings before any compute is spent (``stored``:
    a config read back by :func:`from_dict`, which may hold a cleared ``run.dir``; ``presets``:
    the packaged presets' values it was built on, see :func:`check_modes`)."""
    for key, options in CHOICES.items():
        value = get_value(cfg, key)
        if value not in options:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}")
    _check_numbers(cfg, stored)  # first: later checks divide by these
    m, t, d = cfg.model, cfg.train, cfg.data
    if d.image_size % m.patch_size:
        raise ConfigError(
            f"data.image_size={d.image_size} must be a multiple of model.patch_size={m.patch_size}"
        )
    grid = grid_side(d.image_size, m.patch_size)
    if grid > MAX_GRID:
        raise ConfigError(
            f"data.image_size={d.image_size} with model.patch_size={m.patch_size} gives a "
            f"{grid}x{grid} token grid, past the {MAX_GRID}x{MAX_GRID} supported: lower "
            "data.image_size or raise model.patch_size"
        )
    deepest = max_levels(grid)  # levels down to the first 1x1 grid (ceil pooling)
    if m.levels > deepest:
        raise ConfigError(
            f"model.levels={m.levels} is too deep for a {grid}x{grid} token grid: "
            f"use model.levels<={deepest} or a smaller model.patch_size"
        )
    for dim_key, heads_key in (
        ("embed_dim", "num_heads"),
        ("predictor_embed_dim", "predictor_num_heads"),
    ):
        dim, heads = getattr(m, dim_key), getattr(m, heads_key)
        if dim % heads or dim % 4:
            raise ConfigError(
                f"model.{dim_key}={dim} must be a multiple of 4 (2D positions) and of "
                f"model.{heads_key}={heads}"
            )
    if len(level_weights(cfg)) != m.levels:
        raise ConfigError(
            f"loss.level_weights has {len(cfg.loss.level_weights)} entries but model.levels="
            f"{m.levels}: give one weight per level"
        )
    if t.batch_size % t.accum_steps:
        raise ConfigError("train.batch_size must be a positive multiple of train.accum_steps")
    if t.epochs < 1 and t.max_steps < 1:
        raise ConfigError("set train.epochs >= 1 or train.max_steps >= 1")
    if t.ema_start > t.ema_end:
        raise ConfigError("need 0 <= train.ema_start <= train.ema_end <= 1")
    if t.device == "cpu" and t.precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    _check_masks_feasible(cfg)
    _validate_data(cfg, stored)
    _validate_run(cfg, stored)
    _validate_eval(cfg.eval)
    _validate_encoder_options(cfg)
    _validate_regularizers(cfg)
    _validate_schedules(cfg)
    if not stored:  # a stored config is read as written (runs from before these checks)
        check_modes(cfg, presets or {})


def check_modes(cfg: Config, presets: dict[str, Any] | None = None) -> None:
    """Refuse a value of a key the chosen mode never reads, unless it is the schema default or
    the value of the packaged preset the config is built on (``presets``): two runs that differ
    only in such a key would be the same run under different labels."""
    presets = presets or {}
    for key in SCHEMA.values():
        value = get_value(cfg, key.name)
        given = value != key.default and value != presets.get(key.name, key.default)
        if key.when is not None and given and not key.when.active(cfg):
            raise ConfigError(
                f"{key.name}={_show(value)} has no effect with {key.when.state(cfg)}; remove it "
                f"or {key.when.fix}"
            )


def _show(value: Any) -> str:
    return f"[{', '.join(map(_num, value))}]" if isinstance(value, list) else _num(value)


def _validate_schedules(cfg: Config) -> None:
    """Schedules that contradict themselves, and a loss that is zero whatever the weights."""
    o, t, loss = cfg.optim, cfg.train, cfg.loss
    if o.start_lr > o.lr:
        raise ConfigError(
            f"optim.start_lr={_num(o.start_lr)} is above the peak optim.lr={_num(o.lr)}: the "
            "warmup would lower the rate; use a start_lr <= lr"
        )
    if t.max_steps and o.warmup_steps > t.max_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} is longer than the run (train.max_steps="
            f"{t.max_steps}): the rate would never reach optim.lr; shorten the warmup"
        )
    others = loss.regularizer != "none" or loss.contrastive or cfg.data.multicrop.num_local > 0
    if not any(level_weights(cfg)) and not others:
        raise ConfigError(
            f"loss.level_weights={_show(level_weights(cfg))} with loss.regularizer=none and no "
            "contrast or multi-crop: the loss is 0 at every step; give a level a weight > 0 or "
            "add a regularizer"
        )


def _validate_regularizers(cfg: Config) -> None:
    """Anti-collapse terms and the EMA-free target: each accepted setting must act."""
    loss, m = cfg.loss, cfg.model
    terms = loss.regularizer.split("+")
    if m.target == "shared":
        if loss.regularizer == "none":
            raise ConfigError(
                "model.target=shared needs loss.regularizer=sigreg (or vicreg): without an EMA "
                "teacher nothing stops the encoder from collapsing to a constant"
            )
        if cfg.train.ema_timing != "after_step":
            raise ConfigError(
                "train.ema_timing=before_step has no EMA to time with model.target=shared: "
                "leave train.ema_timing=after_step"
            )
    elif not m.target_stop_grad:
        raise ConfigError(
            "model.target_stop_grad=false needs model.target=shared (the EMA target encoder "
            "never gets gradients)"
        )
    if loss.regularize_on != "context" and "sigreg" not in terms:
        raise ConfigError(
            f"loss.regularize_on={loss.regularize_on} chooses what SIGReg sees, but "
            f"loss.regularizer={loss.regularizer}: add sigreg (VICReg always uses the pooled "
            "embeddings of two views)"
        )
    if loss.regularize_on == "pooled" and m.levels < 2:
        raise ConfigError(
            "loss.regularize_on=pooled with model.levels=1 is loss.regularize_on=context "
            "(no coarser level to pool to): use context or model.levels >= 2"
        )
    if "sigreg" in terms and loss.sigreg_weight <= 0:
        raise ConfigError("loss.sigreg_weight must be > 0 with SIGReg on (or drop sigreg)")
    if "vicreg" in terms:
        if loss.vicreg_weight <= 0:
            raise ConfigError("loss.vicreg_weight must be > 0 with VICReg on (or drop vicreg)")
        if loss.vicreg_var_weight + loss.vicreg_cov_weight + loss.vicreg_inv_weight <= 0:
            raise ConfigError(
                "loss.vicreg_var_weight, vicreg_cov_weight and vicreg_inv_weight are all 0: "
                "give one of them a weight > 0 (paper: 25, 1, 25) or drop vicreg"
            )
    if loss.contrastive and loss.contrastive_weight <= 0:
        raise ConfigError(
            "loss.contrastive_weight must be > 0 with loss.contrastive=true (or set it false)"
        )


def check_attention(attention: str, device: str, precision: str) -> None:
    """``model.attention`` against the (resolved or configured) device and precision."""
    half = attention in ("flash", "cudnn")  # kernels without an fp32 path
    if attention in ("flash", "efficient", "cudnn") and device in ("cpu", "mps"):
        need = " with bf16/fp16" if half else ""
        raise ConfigError(f"model.attention={attention} needs a CUDA GPU{need}; use auto")
    if half and precision == "fp32":
        raise ConfigError(
            f"model.attention={attention} needs a CUDA GPU with bf16/fp16 (train.precision=fp32 "
            "given); use auto or train.precision=bf16"
        )


def _validate_encoder_options(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    check_attention(m.attention, cfg.train.device, cfg.train.precision)
    if m.pos_embed == "rope":
        for dim, heads, name in (
            (m.embed_dim, m.num_heads, "embed_dim/num_heads"),
            (m.predictor_embed_dim, m.predictor_num_heads, "predictor_embed_dim/num_heads"),
        ):
            if (dim // heads) % 4:
                raise ConfigError(
                    f"model.pos_embed=rope needs head widths divisible by 4, but model.{name}"
                    f" = {dim}/{heads}: change the width or the number of heads"
                )
    p = m.patch_size
    if m.stem != "patch" and (p < 2 or p & (p - 1)):
        raise ConfigError(
            f"model.stem={m.stem} needs a power-of-2 model.patch_size >= 2 (one stage per "
            f"halving), got {p}: use patch_size 2, 4, 8 or 16, or model.stem=patch"
        )
    if m.fpn != "none" and m.levels < 2:
        raise ConfigError("model.fpn needs model.levels >= 2 (a coarser level to fuse from)")
    mc = d.multicrop
    if mc.num_local:
        if mc.local_size % m.patch_size or not m.patch_size <= mc.local_size <= d.image_size:
            raise ConfigError(
                f"data.multicrop.local_size={mc.local_size} must be a multiple of "
                f"model.patch_size={m.patch_size} and at most data.image_size={d.image_size}"
            )
        if mc.weight <= 0:
            raise ConfigError(
                "data.multicrop.weight must be > 0 with local crops (or data.multicrop.num_local=0)"
            )


def _validate_data(cfg: Config, stored: bool) -> None:
    """Data keys that could not act on the dataset named. A stored config is read as written:
    runs from before data.channels=0 existed recorded 1 for every dataset."""
    d = cfg.data
    native = NATIVE_CHANNELS.get(d.name)
    if native and d.channels not in (0, native) and not stored:
        raise ConfigError(
            f"data.channels={d.channels} contradicts {d.name}, whose images have {native} "
            "channel(s): leave data.channels=0 (follow the data)"
        )


def _validate_run(cfg: Config, stored: bool) -> None:
    """Periodic checkpoints are kept when one is written: keep_every must meet checkpoint_every."""
    run = cfg.run
    if stored or not run.keep_every or run.keep_every % run.checkpoint_every == 0:
        return
    below = run.keep_every // run.checkpoint_every * run.checkpoint_every
    fits = [n for n in (below, below + run.checkpoint_every) if n > 0]
    raise ConfigError(
        f"run.keep_every={run.keep_every} is not a multiple of run.checkpoint_every="
        f"{run.checkpoint_every}: checkpoints are written every {run.checkpoint_every} steps, so "
        f"few or none would be kept; use run.keep_every={' or '.join(map(str, fits))}"
    )


def _validate_eval(e: EvalConfig) -> None:
    for spec in e.transfer:
        kind, _, path = spec.partition(":")
        if not (spec == "digits" or (kind == "image_folder" and path)):
            raise ConfigError(
                f"eval.transfer entry {spec!r} must be 'digits' or 'image_folder:PATH'"
            )


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
