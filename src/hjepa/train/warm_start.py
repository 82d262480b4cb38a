"""``train.init_from``: a new run that starts from another run's encoder weights.

Fine-tuning or continued pretraining: the context and target encoders are copied from the
source checkpoint (the predictor and its per-level heads too when their shapes fit this
config); the optimizer, the schedules and the step count start fresh, and every other part
keeps its own initialisation. Only a new run reads ``train.init_from``: on a run dir that
already holds a checkpoint the run goes on from that (:mod:`hjepa.train.recipe` refuses a
``train.init_from`` that differs from the stored one).

With ``model.target=shared`` (one encoder) the source's target encoder seeds it: the encoder
``hjepa eval`` probes and ``hjepa export`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hjepa import checkpoint as ckpt
from hjepa.config import Config, ConfigError
from hjepa.train.recipe import config_diff, is_architecture


@dataclass(frozen=True)
class WarmStart:
    """What was copied: the checkpoint file, the source run's step and the parts loaded."""

    checkpoint: Path
    source_step: int
    loaded: tuple[str, ...]

    def describe(self) -> str:
        fresh = "" if "predictor" in self.loaded else ", a new predictor (the source's differs)"
        return (
            f"starting from {self.checkpoint} (step {self.source_step}): its "
            f"{', '.join(self.loaded)}{fresh}; a fresh optimizer and schedule"
        )

    def record(self) -> dict:
        """The ``init_from`` record of ``metrics.jsonl``."""
        return {
            "checkpoint": str(self.checkpoint),
            "source_step": self.source_step,
            "loaded": list(self.loaded),
        }


def source_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``train.init_from`` names: a file, or a run dir's ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        last = ckpt.checkpoint_dir(path) / ckpt.LAST
        if not last.is_file():
            raise ConfigError(f"train.init_from={path}: that run dir has no checkpoints/last.pt")
        return last
    if not path.is_file():
        raise ConfigError(f"train.init_from={path}: no such run dir or checkpoint file")
    return path


def _misfit(state: dict, cfg: Config, part: str, error: Exception) -> ConfigError:
    try:
        arch = [str(c) for c in config_diff(state["config"], cfg) if is_architecture(c.key)]
    except (ConfigError, KeyError, TypeError, AttributeError):
        arch = []
    if arch:
        why = f"({', '.join(arch)}): set those model/data settings to the source run's"
    else:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        why = f"({first[:200]})"
    return ConfigError(f"train.init_from: the source's {part} does not fit this config {why}")


def _fits(module: nn.Module, weights: dict) -> bool:
    own = module.state_dict()
    return own.keys() == weights.keys() and all(own[k].shape == weights[k].shape for k in own)


def load_init_weights(model: nn.Module, cfg: Config, device: torch.device) -> WarmStart:
    """Copy the encoders (and the predictor + heads when they fit) of ``cfg.train.init_from``
    into ``model`` (an :class:`~hjepa.models.hjepa.HJEPA`) in place."""
    file = source_checkpoint(cfg.train.init_from)
    state = ckpt.load_checkpoint(file, map_location=device)
    missing = [k for k in ("context_encoder", "target_encoder", "config") if k not in state]
    if missing:
        raise ConfigError(f"train.init_from: {file} holds no {' or '.join(missing)}")
    pairs = [("target encoder", model.target_encoder, state["target_encoder"])]
    if not model.shared_target:
        pairs.insert(0, ("context encoder", model.context_encoder, state["context_encoder"]))
    for name, module, weights in pairs:
        if not _fits(module, weights):
            raise _misfit(state, cfg, name, RuntimeError("tensor names or shapes differ"))
        try:
            module.load_state_dict(weights)
        except RuntimeError as e:
            raise _misfit(state, cfg, name, e) from e
    loaded = [name for name, _, _ in pairs]
    predictor = state.get("predictor", {})
    heads = state.get("heads", {})
    if _fits(model.predictor, predictor) and _fits(model.heads, heads):
        model.predictor.load_state_dict(predictor)
        model.heads.load_state_dict(heads)
        loaded.append("predictor")
    return WarmStart(file, int(state["step"]), tuple(loaded))
