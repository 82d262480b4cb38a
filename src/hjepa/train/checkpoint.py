"""A trainer's state in a checkpoint, and the run directory it trains in.

The file format (atomic writes, plain-weights loading, finding the newest usable file) is
:mod:`hjepa.checkpoint`, which eval and export read too; this module maps a :class:`Trainer`
to and from the dict stored there, and prepares ``run.dir`` for a fresh or resumed run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hjepa import checkpoint as ckpt
from hjepa.config import ConfigError, dump_yaml, from_dict
from hjepa.data.datasets import DATASET_RECORD, check_run_dataset, write_run_dataset
from hjepa.train import distributed, recipe
from hjepa.train.logging import truncate_after

if TYPE_CHECKING:
    from hjepa.train.trainer import Trainer


def state_dict(trainer: Trainer) -> dict:
    """Everything a resumed run needs to repeat the uninterrupted one exactly."""
    model = trainer.model
    return {
        "context_encoder": model.context_encoder.state_dict(),
        "target_encoder": model.target_encoder.state_dict(),
        "predictor": model.predictor.state_dict(),
        "heads": model.heads.state_dict(),
        **{k: m.state_dict() for k, m in model.optional_modules().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "step": trainer.step,
        "total_steps": trainer.total_steps,
        "nonfinite_skipped": trainer.skipped_steps,
        "config": trainer.cfg.to_dict(),
    }


def load_state_dict(trainer: Trainer, state: dict) -> None:
    """Continue the run ``state`` holds in ``trainer``: :class:`ConfigError` (a
    :class:`recipe.RecipeChangeError` for a changed recipe) before any weight is touched."""
    run_dir, model, cfg = trainer.run_dir, trainer.model, trainer.cfg
    optional = model.optional_modules()
    if "view_projector" in state and "view_projector" not in optional:
        raise ConfigError(
            f"{run_dir} was trained with multi-crop: resume with the same "
            "data.multicrop.num_local or use a new run.dir"
        )
    if "contrastive_projector" in state and "contrastive_projector" not in optional:
        raise ConfigError(
            f"{run_dir} was trained with loss.contrastive=true: resume with it or use a new run.dir"
        )
    for name in optional:
        if name not in state:
            raise ConfigError(
                f"{run_dir} was trained without the {name} of this config "
                "(model.fpn / data.multicrop.num_local / loss.contrastive): use a new run.dir"
            )
    trainer.run_only_changes, trainer.recipe_changes = recipe.check_resume(
        state["config"], cfg, run_dir, allow=trainer.allow_config_change
    )
    stored_init = state["config"].get("train", {}).get("init_from", "")
    if stored_init and not cfg.train.init_from:  # keep the run's record of where it started
        cfg.train.init_from = stored_init
    modules = {
        "context_encoder": model.context_encoder,
        "target_encoder": model.target_encoder,
        "predictor": model.predictor,
        "heads": model.heads,
        **optional,
    }
    for name, module in modules.items():  # a misfit names the module and its shapes
        ckpt.load_module_state(module, state[name], name)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.skipped_steps = int(state.get("nonfinite_skipped", 0))
    trainer.step = int(state["step"])


def write(trainer: Trainer) -> None:
    """``checkpoints/last.pt``, and ``step_<step>.pt`` every ``run.keep_every`` steps."""
    state = state_dict(trainer)
    directory = ckpt.checkpoint_dir(trainer.run_dir)
    ckpt.atomic_save(state, directory / ckpt.LAST)
    keep = trainer.cfg.run.keep_every
    if keep and trainer.step % keep == 0:
        ckpt.atomic_save(state, directory / f"step_{trainer.step:08d}.pt")


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume (usable or not)."""
    return bool(ckpt.candidates(run_dir))


def last_path(run_dir: Path) -> Path:
    return ckpt.checkpoint_dir(run_dir) / ckpt.LAST


def last_good(run_dir: Path, saved_step: int | None) -> str:
    """Where the newest complete checkpoint of this run is, for error messages."""
    if saved_step is None:
        return "no checkpoint was written by this run yet"
    last = ckpt.checkpoint_dir(run_dir) / ckpt.LAST
    return f"the last good checkpoint {last} (step {saved_step}), left untouched"


def restore(trainer: Trainer, path: Path) -> None:
    """Load one checkpoint; :class:`ckpt.CheckpointError` when that file is unusable."""
    state = ckpt.load_checkpoint(path, map_location=trainer.device)
    try:
        from_dict(state["config"])  # the stored config must still be valid
    except (ConfigError, KeyError, TypeError, AttributeError) as e:
        raise ckpt.CheckpointError(f"checkpoint {path} holds no valid config ({e})") from e
    try:
        load_state_dict(trainer, state)
    except ConfigError:
        raise  # the user changed the recipe: no older checkpoint would fit either
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise ckpt.CheckpointError(
            f"checkpoint {path} does not fit the model it was saved from ({ckpt.first_sentence(e)})"
        ) from e


def prepare_run_dir(trainer: Trainer) -> bool:
    """Resume from the newest usable checkpoint, if any; a new run writes its config.

    The checkpoint (and the recipe check against its config) comes first: a refused resume
    leaves every file of the run dir as it was. A resume never rewrites ``config.yaml`` (the
    recipe the run started with); a change it was allowed to make is appended to
    ``config_history.yaml``. Returns whether the trainer resumed; its ``step`` and
    ``saved_step`` then say from where.
    """
    run_dir, env = trainer.run_dir, trainer.dist
    if not env.is_main:  # rank 0 tidies the run dir and resumes first, then the rest
        distributed.barrier(env)
        resumed = ckpt.restore_latest(run_dir, lambda p: restore(trainer, p)) is not None
        trainer.saved_step = trainer.step if resumed else None
        return resumed
    restored = ckpt.restore_latest(run_dir, lambda p: restore(trainer, p))
    if restored is not None:  # the folder must still be split as the run's start recorded
        check_run_dataset(run_dir, trainer.train_set)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt.remove_stale_temp(ckpt.checkpoint_dir(run_dir))
    except OSError as e:
        raise ckpt.CheckpointWriteError(
            e.errno, f"cannot write the run directory {run_dir}: {e.strerror or e}"
        ) from e
    if stale:
        print(f"removed {len(stale)} partial checkpoint(s) of a killed run", file=sys.stderr)
    if restored is not None:
        trainer.saved_step = trainer.step
    # Also on a fresh start: drop records of a run killed before its first checkpoint.
    truncate_after(run_dir, trainer.step)
    config_path = run_dir / "config.yaml"
    if restored is None or not config_path.is_file():
        config_text = dump_yaml(trainer.cfg).encode()
        ckpt.atomic_write(config_path, lambda f: f.write(config_text), "config")
    if restored is None or not (run_dir / DATASET_RECORD).is_file():
        write_run_dataset(run_dir, trainer.train_set)
    if trainer.recipe_changes:
        entry = recipe.history_entry(trainer.step, trainer.recipe_changes, restored)
        recipe.append_history(run_dir, entry)
    distributed.barrier(env)
    return restored is not None
