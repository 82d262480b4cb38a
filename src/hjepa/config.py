"""Typed configuration: a dataclass schema, packaged YAML presets and ``key=value`` overrides.

Every key is checked: an unknown or mistyped key is an error that names the closest valid key,
and every value is coerced to the schema's type (or refused), so a config that loads is a config
whose every option does something.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hjepa.grid import grid_side, max_levels


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    checkpoint_every: int = 200  # steps between rewrites of checkpoints/last.pt
    keep_every: int = 0  # steps between kept periodic checkpoints (0: none besides last.pt)
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar on stderr


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 10
    max_steps: int = 0  # optimizer steps for the whole run; overrides epochs when > 0
    stop_after: int = 0  # end this invocation after that many steps (schedule of the full run)
    batch_size: int = 128  # global batch per optimizer step (split over ranks and accumulation)
    accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_start: float = 0.996
    ema_end: float = 1.0
    ema_timing: str = "after_step"  # 'before_step' reproduces the old bug, for the ablation only
    log_every: int = 20
    knn_every: int = 0  # steps between online kNN probes (0: only at the end)
    knn_bank_size: int = 5000  # train images in the online kNN memory bank
    knn_query_size: int = 1000  # held-out test images queried by the online kNN
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 elsewhere)
    num_workers: int = 0  # dataloader workers for datasets decoded from files
    threads: int = 0  # torch intra-op threads on CPU (0: PyTorch's default)
    nonfinite: str = "stop"  # NaN/inf loss or gradient: stop (keep last checkpoint) | skip step
    compile: bool = False  # torch.compile the encoders and the predictor (GPU: faster steps)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate, reached after warmup
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_steps: int = 0
    warmup_fraction: float = 0.05  # used when warmup_steps is 0
    weight_decay: float = 0.04  # start of the cosine weight-decay schedule
    final_weight_decay: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class AugmentConfig:
    """DeiT III style batched augmentations on top of the crop + flip (all off by default)."""

    three_augment: float = 0.0  # probability of one of grayscale / solarize / blur per image
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # pixels
    color_jitter: float = 0.0  # brightness/contrast (+ saturation on RGB) factors in 1 +- s
    mixup: float = 0.0  # Beta(a, a) concentration; 0: off
    cutmix: float = 0.0  # Beta(a, a) concentration; 0: off (both on: one of them per batch)
    random_erasing: float = 0.0  # probability of erasing one random box per image


@dataclass
class MultiCropConfig:
    """Extra local crops whose pooled context embedding predicts the global pooled target."""

    num_local: int = 0  # 0: off
    local_size: int = 16  # pixels, a multiple of model.patch_size
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    weight: float = 1.0  # weight of the view-prediction term in the loss


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str = ""  # '' means the dataset's default locations
    image_size: int = 28
    channels: int = 1  # used by 'synthetic'; real datasets have their own
    synthetic_size: int = 2048
    class_subset: str = ""  # image_folder only: 'imagenet100' or a file of class names
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)


@dataclass
class ModelConfig:
    patch_size: int = 4
    # patch: one linear projection per patch (ViT) | conv: stride-2 3x3 conv stack, same grid
    stem: str = "patch"
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    predictor_embed_dim: int = 96
    predictor_depth: int = 4
    predictor_num_heads: int = 3
    levels: int = 3
    drop_path: float = 0.0
    normalize_targets: bool = False  # extra L2 normalisation of targets and predictions
    # repeat: I-JEPA's predictor (context repeated per target block); shared: one pass, the
    # context attends only to itself and each block to the context and itself (docs/scale.md)
    predictor_mode: str = "repeat"
    attention: str = "auto"  # SDPA kernel for training: auto | math | efficient | flash
    pos_embed: str = "sincos"  # sincos (added to tokens) | rope (axial 2D RoPE in attention)
    layer_scale: float = 0.0  # LayerScale initial gain on every residual branch (0: off)
    grad_checkpointing: bool = False  # recompute each block in backward (less memory)
    fpn: str = "none"  # none | add | concat: top-down pathway over the level predictions
    # ema: targets from an EMA copy of the context encoder; shared: from the context encoder
    # itself on the full image (LeJEPA's EMA-free mode; needs an anti-collapse regulariser)
    target: str = "ema"
    target_stop_grad: bool = True  # shared targets carry no gradient (false: they do)


@dataclass
class MaskingConfig:
    num_targets: int = 4
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    scale_mode: str = "constant"  # constant (option A) | gentle (option B) | geometric (old bug)
    min_context: int = 4


@dataclass
class LossConfig:
    distance: str = "mse"  # mse | smooth_l1
    level_weights: list[float] = field(default_factory=list)  # [] -> [1.0, 0.7, 0.5, 0.35][:levels]
    regularizer: str = "none"  # none | sigreg | vicreg | sigreg+vicreg (docs/regularizers.md)
    regularize_on: str = "context"  # what SIGReg sees: context | predictor | pooled
    sigreg_weight: float = 0.05
    sigreg_slices: int = 1024
    # SIGReg on each view's pooled embedding (global context + multi-crop local crops; LeJEPA)
    view_sigreg: float = 0.0
    vicreg_weight: float = 0.1  # x (var_w * var + cov_w * cov + inv_w * inv), two views
    vicreg_var_weight: float = 25.0
    vicreg_cov_weight: float = 1.0
    vicreg_inv_weight: float = 25.0  # the paper's similarity (invariance) coefficient
    contrastive: bool = False  # C-JEPA: NT-Xent between the pooled embeddings of two views
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    contrastive_hidden_dim: int = 512  # projection head: Linear-BN-GELU-Linear
    contrastive_out_dim: int = 128


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 512
    train_limit: int = 0  # cap on train images used by the probes (0: all)
    linear: bool = True
    baselines: bool = True  # also probe raw pixels and a random-init encoder
    low_shot: bool = True  # linear probes on class-balanced label fractions (best features)
    low_shot_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    low_shot_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    robustness: bool = True  # corrupted test set (8 corruptions x 5 severities), mCE vs pixels
    robustness_limit: int = 2000  # test images corrupted (0: the whole test set)
    transfer: list[str] = field(default_factory=list)  # 'digits' | 'image_folder:PATH'
    # Baselines (pixels, random init) are reused from a cache keyed by data, architecture,
    # seed and protocol; cache_dir "" is $HJEPA_CACHE_DIR or ~/.cache/hjepa.
    cache: bool = True
    cache_dir: str = ""


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

CHOICES = {
    "train.ema_timing": ("after_step", "before_step"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.nonfinite": ("stop", "skip"),
    "data.name": ("fashion_mnist", "cifar10", "cifar100", "image_folder", "synthetic"),
    "masking.scale_mode": ("constant", "gentle", "geometric"),
    "model.predictor_mode": ("repeat", "shared"),
    "model.attention": ("auto", "math", "efficient", "flash", "cudnn"),
    "model.pos_embed": ("sincos", "rope"),
    "model.stem": ("patch", "conv"),
    "model.fpn": ("none", "add", "concat"),
    "model.target": ("ema", "shared"),
    "loss.distance": ("mse", "smooth_l1"),
    "loss.regularizer": ("none", "sigreg", "vicreg", "sigreg+vicreg"),
    "loss.regularize_on": ("context", "predictor", "pooled"),
}


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted names of every setting under ``node``; nested dataclasses (data.augment) recurse."""
    keys = []
    for name in typing.get_type_hints(type(node)):
        value = getattr(node, name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def valid_keys(cfg: Config | None = None) -> list[str]:
    return _leaf_keys(cfg or Config())


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
    close = [close] if close else []
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
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
            raise _unknown(key, valid_keys(cfg))
        node = child
    hints = typing.get_type_hints(type(node))
    if not path or name not in hints:
        raise _unknown(key, valid_keys(cfg))
    if dataclasses.is_dataclass(getattr(node, name)):
        if not isinstance(value, dict):  # a group: 'data.augment={mixup: 0.2}' sets its keys
            first = _leaf_keys(getattr(node, name))[0]
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


def _parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` whose syntax errors are one line: ``source:line:column: problem``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path, res = Path(name_or_path), None
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        text = path.read_text()
    else:
        res = resources.files("hjepa") / "configs" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown preset '{name_or_path}'; presets: {', '.join(preset_names())}"
                " (or give a path to a .yaml file)"
            )
        text = res.read_text()
    tree = _parse_yaml(text, str(path) if res is None else f"preset {name_or_path}") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config {name_or_path} must be a mapping of sections")
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.max_steps=100")
    key, _, raw = item.partition("=")
    if not raw.strip():
        return key.strip(), ""
    try:
        return key.strip(), yaml.safe_load(raw)
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
        for key, value in _flatten(_read_yaml(preset)).items():
            _set(cfg, key, value)
    for item in overrides:
        _set(cfg, *parse_override(item))
    validate(cfg)
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


def _check_range(key: str, pair: list[float], low: float, high: float) -> None:
    if len(pair) != 2 or not (low <= pair[0] <= pair[1] <= high):
        raise ConfigError(
            f"{key} must be [min, max] with {low} <= min <= max <= {high}, got {pair}"
        )


# Lower bounds of numeric settings: below them a run would divide by zero, build an empty
# layer or silently do nothing (reliability fuzzing, tests/test_validation_fuzz.py).
MINIMUM = {
    "run.checkpoint_every": 1,
    "run.keep_every": 0,
    "train.epochs": 0,
    "train.max_steps": 0,
    "train.stop_after": 0,
    "train.log_every": 1,
    "train.knn_every": 0,
    "train.knn_bank_size": 0,
    "train.knn_query_size": 0,
    "train.num_workers": 0,
    "train.threads": 0,
    "train.grad_clip": 0.0,
    "optim.start_lr": 0.0,
    "optim.final_lr": 0.0,
    "optim.warmup_steps": 0,
    "optim.warmup_fraction": 0.0,
    "optim.weight_decay": 0.0,
    "optim.final_weight_decay": 0.0,
    "data.image_size": 1,
    "data.channels": 1,
    "data.synthetic_size": 1,
    "model.patch_size": 1,
    "model.embed_dim": 4,
    "model.depth": 1,
    "model.num_heads": 1,
    "model.predictor_embed_dim": 4,
    "model.predictor_depth": 1,
    "model.predictor_num_heads": 1,
    "masking.num_targets": 1,
    "masking.min_context": 1,
    "loss.sigreg_weight": 0.0,
    "loss.sigreg_slices": 1,
    "loss.view_sigreg": 0.0,
    "loss.vicreg_weight": 0.0,
    "loss.vicreg_var_weight": 0.0,
    "loss.vicreg_cov_weight": 0.0,
    "loss.vicreg_inv_weight": 0.0,
    "loss.contrastive_weight": 0.0,
    "loss.contrastive_hidden_dim": 1,
    "loss.contrastive_out_dim": 1,
    "eval.knn_k": 1,
    "eval.batch_size": 1,
}


def _check_numbers(cfg: Config) -> None:
    """Every number finite, every count/size at or above its minimum, ratios in range."""
    keys = valid_keys(cfg)
    for key in keys:
        value = get_value(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}={value} must be a finite number")
    for key, low in MINIMUM.items():
        if key in keys and get_value(cfg, key) < low:
            raise ConfigError(f"{key}={get_value(cfg, key)} must be >= {low}")
    m, o = cfg.model, cfg.optim
    if m.mlp_ratio <= 0 or int(m.embed_dim * m.mlp_ratio) < 1:
        raise ConfigError(f"model.mlp_ratio={m.mlp_ratio} must give an MLP of at least 1 unit")
    if o.warmup_fraction > 1.0:
        raise ConfigError(f"optim.warmup_fraction={o.warmup_fraction} must be in [0, 1]")
    if len(o.betas) == 2 and not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas} must both be in [0, 1), e.g. [0.9, 0.999]")
    if any(w < 0 for w in cfg.loss.level_weights):
        raise ConfigError(f"loss.level_weights={cfg.loss.level_weights} must be >= 0")
    if cfg.eval.knn_temperature <= 0:
        raise ConfigError("eval.knn_temperature must be > 0")


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
    """Refuse mask settings no draw can satisfy: even with the largest context square and the
    smallest target block pushed into the opposite corner, fewer than ``min_context`` tokens
    would be left. (This bound is never too strict; the trainer also draws once at start.)

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


def validate(cfg: Config, *, stored: bool = False) -> None:
    """Refuse contradictory or impossible settings before any compute is spent (``stored``:
    a config read back by :func:`from_dict`, which may hold a cleared ``run.dir``)."""
    for key, options in CHOICES.items():
        value = get_value(cfg, key)
        if value not in options:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}")
    _check_numbers(cfg)  # first: later checks divide by these
    if not stored and not cfg.run.dir.strip():
        raise ConfigError(
            "run.dir is empty: name the folder the run writes to, e.g. run.dir=runs/mine"
        )
    m, t, d = cfg.model, cfg.train, cfg.data
    if d.image_size % m.patch_size:
        raise ConfigError(
            f"data.image_size={d.image_size} must be a multiple of model.patch_size={m.patch_size}"
        )
    grid = grid_side(d.image_size, m.patch_size)
    if not 1 <= m.levels <= 4:
        raise ConfigError(f"model.levels must be between 1 and 4, got {m.levels}")
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
    if t.batch_size < 1 or t.accum_steps < 1 or t.batch_size % t.accum_steps:
        raise ConfigError("train.batch_size must be a positive multiple of train.accum_steps")
    if t.epochs < 1 and t.max_steps < 1:
        raise ConfigError("set train.epochs >= 1 or train.max_steps >= 1")
    if not 0.0 <= t.ema_start <= t.ema_end <= 1.0:
        raise ConfigError("need 0 <= train.ema_start <= train.ema_end <= 1")
    if not 0.0 <= m.drop_path < 1.0:
        raise ConfigError("model.drop_path must be in [0, 1)")
    _check_range("masking.target_scale", cfg.masking.target_scale, 1e-6, 1.0)
    _check_range("masking.context_scale", cfg.masking.context_scale, 1e-6, 1.0)
    _check_range("masking.target_aspect", cfg.masking.target_aspect, 1e-3, 1e3)
    _check_range("data.crop_scale", d.crop_scale, 1e-3, 1.0)
    _check_range("data.crop_ratio", d.crop_ratio, 1e-2, 1e2)
    if not 0.0 <= d.hflip <= 1.0:
        raise ConfigError("data.hflip is a probability in [0, 1]")
    if t.device == "cpu" and t.precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    if cfg.optim.lr <= 0 or len(cfg.optim.betas) != 2:
        raise ConfigError("optim.lr must be > 0 and optim.betas a pair")
    _check_masks_feasible(cfg)
    _validate_eval(cfg.eval)
    _validate_encoder_options(cfg)
    _validate_regularizers(cfg)


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
    if loss.view_sigreg > 0 and cfg.data.multicrop.num_local < 1:
        raise ConfigError(
            "loss.view_sigreg acts on the pooled embeddings of multi-crop views: set "
            "data.multicrop.num_local >= 1 (or loss.view_sigreg=0)"
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
    if loss.contrastive_temperature <= 0:
        raise ConfigError("loss.contrastive_temperature must be > 0, e.g. 0.1")
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
    if m.stem == "conv" and (p < 2 or p & (p - 1)):
        raise ConfigError(
            f"model.stem=conv needs a power-of-2 model.patch_size >= 2 (one stride-2 conv per "
            f"halving), got {p}: use patch_size 2, 4, 8 or 16, or model.stem=patch"
        )
    if m.layer_scale < 0:
        raise ConfigError("model.layer_scale is an initial gain >= 0 (0: off), e.g. 1e-4 or 0.1")
    if m.fpn != "none" and m.levels < 2:
        raise ConfigError("model.fpn needs model.levels >= 2 (a coarser level to fuse from)")
    a = d.augment
    for name in ("three_augment", "random_erasing"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            raise ConfigError(f"data.augment.{name} is a probability in [0, 1]")
    if not 0.0 <= a.color_jitter < 1.0:
        raise ConfigError("data.augment.color_jitter is a strength in [0, 1), e.g. 0.3")
    if a.mixup < 0 or a.cutmix < 0:
        raise ConfigError("data.augment.mixup/cutmix are Beta concentrations >= 0 (0: off)")
    _check_range("data.augment.blur_sigma", a.blur_sigma, 1e-3, 100.0)
    mc = d.multicrop
    if mc.num_local < 0:
        raise ConfigError("data.multicrop.num_local must be >= 0 (0: off)")
    if mc.num_local:
        if mc.local_size % m.patch_size or not m.patch_size <= mc.local_size <= d.image_size:
            raise ConfigError(
                f"data.multicrop.local_size={mc.local_size} must be a multiple of "
                f"model.patch_size={m.patch_size} and at most data.image_size={d.image_size}"
            )
        _check_range("data.multicrop.local_scale", mc.local_scale, 1e-3, 1.0)
        if mc.weight <= 0:
            raise ConfigError(
                "data.multicrop.weight must be > 0 with local crops (or data.multicrop.num_local=0)"
            )


def _validate_eval(e: EvalConfig) -> None:
    if not e.low_shot_fractions or not all(0.0 < f <= 1.0 for f in e.low_shot_fractions):
        raise ConfigError("eval.low_shot_fractions must be a non-empty list in (0, 1], e.g. [0.01]")
    if not e.low_shot_seeds:
        raise ConfigError("eval.low_shot_seeds must list at least one seed, e.g. [0, 1, 2]")
    if e.robustness_limit < 0 or e.train_limit < 0:
        raise ConfigError("eval.robustness_limit and eval.train_limit must be >= 0 (0: all)")
    for spec in e.transfer:
        kind, _, path = spec.partition(":")
        if not (spec == "digits" or (kind == "image_folder" and path)):
            raise ConfigError(
                f"eval.transfer entry {spec!r} must be 'digits' or 'image_folder:PATH'"
            )


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
