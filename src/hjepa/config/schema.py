"""The configuration schema: every key once, with its type (``Literal`` for a choice), default,
bounds, one-line description and the mode it acts in.

Everything else reads the keys from here: the choices other modules accept (:data:`CHOICES`),
the lower bounds (:data:`MINIMUM`), the checks of :mod:`hjepa.config.rules`, ``hjepa config
--list`` and docs/config.md.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from hjepa.config.modes import (
    ANY_SIGREG,
    ATTENTIVE_PROBE,
    BASELINE_CACHE,
    CACHED_WORK,
    CONTRAST,
    EMA_TARGET,
    FILES,
    IMAGE_FOLDER,
    LOW_SHOT,
    MULTICROP,
    ROBUSTNESS,
    SHARED_TARGET,
    SYNTHETIC,
    THREE_AUGMENT,
    TOKEN_SIGREG,
    VICREG,
    WARMUP,
    WARMUP_BY_FRACTION,
    Mode,
)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


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
            text = f"{'>' if self.low_open else '>='} {number_text(self.low)}"
        elif self.low is None:
            text = f"{'<' if self.high_open else '<='} {number_text(self.high)}"
        else:
            text = (
                f"in {'(' if self.low_open else '['}{number_text(self.low)}, "
                f"{number_text(self.high)}{')' if self.high_open else ']'}"
            )
        return f"{self.what} {text}" if self.what else text


def number_text(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


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
#: ``loss.level_weights=[]``: the weight of each level, level 0 first (I-JEPA's term weighs 1).
DEFAULT_LEVEL_WEIGHTS = (1.0, 0.7, 0.5, 0.35)


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
        False, "compile the step: forward + loss, and the update (clip, AdamW, EMA), fullgraph"
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
    decoder: Literal["pillow", "simplejpeg"] = setting(
        "pillow",
        "image_folder only: JPEG decoder (simplejpeg: pip install 'hjepa[fastjpeg]')",
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
        [],
        f"weight of each level's loss ([]: {', '.join(map(str, DEFAULT_LEVEL_WEIGHTS))} for the"
        " first levels)",
        ge=0.0,
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

    @property
    def terms(self) -> list[str]:
        """The anti-collapse terms ``regularizer`` names: ``sigreg+vicreg`` -> both."""
        return self.regularizer.split("+")


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
        [0.01, 0.1],
        "label fractions of the low-shot probes",
        gt=0.0,
        le=1.0,
        nonempty=True,
        when=LOW_SHOT,
    )
    low_shot_seeds: list[int] = setting(
        [0, 1, 2], "seeds of the low-shot label draws", nonempty=True, when=LOW_SHOT
    )
    attentive: bool = setting(
        True, "attentive probe (V-JEPA: a learned query cross-attends to the frozen tokens)"
    )
    attentive_epochs: int = setting(
        4, "epochs of every attentive probe", ge=1, when=ATTENTIVE_PROBE
    )
    attentive_lrs: list[float] = setting(
        [0.01, 0.03],
        "AdamW learning rates the attentive probe chooses from",
        gt=0.0,
        nonempty=True,
        when=ATTENTIVE_PROBE,
    )
    attentive_weight_decays: list[float] = setting(
        [0.05],
        "AdamW weight decays the attentive probe chooses from",
        ge=0.0,
        nonempty=True,
        when=ATTENTIVE_PROBE,
    )
    robustness: bool = setting(True, "probe a corrupted test set (8 corruptions x 5 severities)")
    robustness_limit: int = setting(
        2000, "test images corrupted (0: the whole test set)", ge=0, when=ROBUSTNESS
    )
    transfer: list[str] = setting([], "other datasets to probe: 'digits' or 'image_folder:PATH'")
    cache: bool = setting(
        True,
        "reuse the baselines (pixels, random init) from a cache of earlier evaluations",
        when=CACHED_WORK,
    )
    cache_dir: str = setting(
        "", "folder of that cache ('': $HJEPA_CACHE_DIR or ~/.cache/hjepa)", when=BASELINE_CACHE
    )


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


#: Datasets whose images have a fixed channel count: data.channels may be 0 or that count.
NATIVE_CHANNELS = {"fashion_mnist": 1, "cifar10": 3, "cifar100": 3}
#: Largest token grid side (65 536 tokens an image): far past what attention holds, and the
#: mask checks below take time quadratic in the side.
MAX_GRID = 256


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


def level_weights(cfg: Config) -> list[float]:
    """:math:`w_l`, one per level: ``loss.level_weights``, else the defaults' first levels."""
    return list(cfg.loss.level_weights) or list(DEFAULT_LEVEL_WEIGHTS[: cfg.model.levels])
