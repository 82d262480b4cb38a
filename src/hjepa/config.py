"""Typed configuration: a dataclass schema, packaged YAML presets and ``key=value`` overrides.

Every key is checked: an unknown or mistyped key is an error that names the closest valid key,
and every value is coerced to the schema's type (or refused), so a config that loads is a config
whose every option does something.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


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


@dataclass
class ModelConfig:
    patch_size: int = 4
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
    regularizer: str = "none"  # none | sigreg (on the context encoder's tokens)
    sigreg_weight: float = 0.05
    sigreg_slices: int = 1024


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 512
    train_limit: int = 0  # cap on train images used by the probes (0: all)
    linear: bool = True
    baselines: bool = True  # also probe raw pixels and a random-init encoder


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
    "data.name": ("fashion_mnist", "cifar10", "cifar100", "image_folder", "synthetic"),
    "masking.scale_mode": ("constant", "gentle", "geometric"),
    "loss.distance": ("mse", "smooth_l1"),
    "loss.regularizer": ("none", "sigreg"),
}


def valid_keys(cfg: Config | None = None) -> list[str]:
    cfg = cfg or Config()
    return [
        f"{section}.{name}"
        for section in typing.get_type_hints(Config)
        for name in typing.get_type_hints(type(getattr(cfg, section)))
    ]


def _unknown(key: str, options: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
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
    section, _, name = key.partition(".")
    hints = typing.get_type_hints(Config)
    if section not in hints or not name:
        raise _unknown(key, valid_keys(cfg))
    sub = getattr(cfg, section)
    sub_hints = typing.get_type_hints(type(sub))
    if name not in sub_hints:
        raise _unknown(key, valid_keys(cfg))
    setattr(sub, name, _coerce(key, value, sub_hints[name]))


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


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
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
    tree = yaml.safe_load(text) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config {name_or_path} must be a mapping of sections")
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.max_steps=100")
    key, _, raw = item.partition("=")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


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
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def level_weights(cfg: Config) -> list[float]:
    return list(cfg.loss.level_weights) or list(DEFAULT_LEVEL_WEIGHTS[: cfg.model.levels])


def _check_range(key: str, pair: list[float], low: float, high: float) -> None:
    if len(pair) != 2 or not (low <= pair[0] <= pair[1] <= high):
        raise ConfigError(
            f"{key} must be [min, max] with {low} <= min <= max <= {high}, got {pair}"
        )


def validate(cfg: Config) -> None:
    """Refuse contradictory or impossible settings before any compute is spent."""
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}")
    m, t, d = cfg.model, cfg.train, cfg.data
    if d.image_size % m.patch_size:
        raise ConfigError(
            f"data.image_size={d.image_size} must be a multiple of model.patch_size={m.patch_size}"
        )
    grid = d.image_size // m.patch_size
    if not 1 <= m.levels <= 4:
        raise ConfigError(f"model.levels must be between 1 and 4, got {m.levels}")
    if grid >> (m.levels - 1) < 1:
        deepest = grid.bit_length()
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
    if min(t.max_steps, t.stop_after, t.log_every - 1, t.knn_every) < 0:
        raise ConfigError("step counts (max_steps, stop_after, knn_every, log_every) must be >= 0")
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


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
