"""The rules between keys: a config that loads is one every part can build and run, and whose
every option does something.

:func:`validate` runs them all, cheapest first, before any compute is spent; each refusal is one
line that names the keys and says what to change.
"""

from __future__ import annotations

import math
from typing import Any

from hjepa.config.schema import (
    CHOICES,
    MAX_GRID,
    NATIVE_CHANNELS,
    SCHEMA,
    Config,
    ConfigError,
    EvalConfig,
    Key,
    get_value,
    level_weights,
    number_text,
)
from hjepa.grid import block_side, check_depth, check_min_context, grid_side


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
                f"{key.name} must be [min, max] with {number_text(b.low)} <= min <= max <= "
                f"{number_text(b.high)}, got {value}"
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
    c = block_side(mk.context_scale[1] * n, grid)
    in_context = _row_cover(grid, c)
    lo, hi = mk.target_aspect
    for aspect in {lo, hi, min(max(1.0, lo), hi)}:
        area = mk.target_scale[0] * n
        rows = _row_cover(grid, block_side(area * aspect, grid))
        cols = _row_cover(grid, block_side(area / aspect, grid))
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
    _as_config_error(check_min_context, mk.min_context, grid)
    (s_lo, _), (a_lo, a_hi) = mk.target_scale, mk.target_aspect
    h_min = block_side(s_lo * n * a_lo, grid)  # smallest height any target block can have
    w_min = block_side(s_lo * n / a_hi, grid)  # smallest width
    c_lo, c_hi = (block_side(s * n, grid) for s in mk.context_scale)
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
    _validate_model(cfg)
    t = cfg.train
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


def _validate_model(cfg: Config) -> None:
    """The token grid, the levels it pools to, head widths and one loss weight per level."""
    m, d = cfg.model, cfg.data
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
    _as_config_error(check_depth, m.levels, grid)
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
    """``value`` as a ``key=value`` override writes it: ``[0.1, 0.2]``, ``false``, ``0.001``."""
    if isinstance(value, bool):
        return str(value).lower()
    return (
        f"[{', '.join(map(number_text, value))}]" if isinstance(value, list) else number_text(value)
    )


def _validate_schedules(cfg: Config) -> None:
    """Schedules that contradict themselves, and a loss that is zero whatever the weights."""
    o, t, loss = cfg.optim, cfg.train, cfg.loss
    if o.start_lr > o.lr:
        raise ConfigError(
            f"optim.start_lr={number_text(o.start_lr)} is above the peak optim.lr="
            f"{number_text(o.lr)}: the warmup would lower the rate; use a start_lr <= lr"
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
    terms = loss.terms
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


def _as_config_error(check, *args: Any) -> None:
    """A rule of :mod:`hjepa.grid` (the layer below, shared with the mask sampler) as a
    :class:`ConfigError`."""
    try:
        check(*args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
