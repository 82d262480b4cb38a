"""A run directory started or resumed: which checkpoint a run continues from, and what a new
run records.

The file format (atomic writes, plain-weights loading, finding the newest usable file) is
:mod:`hjepa.checkpoint`, which eval and export read too. What a checkpoint holds is the parts'
own state dicts and the trainer's counters (:meth:`hjepa.train.trainer.Trainer.state_dict`);
this module only moves such dicts between the trainer and the run directory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from hjepa import checkpoint as ckpt
from hjepa.config import Config, ConfigError, dump_yaml, from_dict
from hjepa.data.datasets import DATASET_RECORD, check_run_dataset, write_run_dataset
from hjepa.train import distributed, recipe
from hjepa.train.logging import truncate_after


def check_modules(state: dict, optional: Iterable[str], run_dir: Path) -> None:
    """Refuse a checkpoint whose optional modules (FPN, multi-crop, contrast) are not this
    config's ``optional`` ones, before any weight is touched."""
    optional = set(optional)
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


def read(path: Path, device: torch.device, load: Callable[[dict], None]) -> None:
    """Hand checkpoint ``path`` to ``load``; :class:`ckpt.CheckpointError` when that file is
    unusable (a changed recipe stays a :class:`ConfigError`: no older file would fit either)."""
    state = ckpt.load_checkpoint(path, map_location=device)
    try:
        from_dict(state["config"])  # the stored config must still be valid
    except (ConfigError, KeyError, TypeError, AttributeError) as e:
        raise ckpt.CheckpointError(f"checkpoint {path} holds no valid config ({e})") from e
    try:
        load(state)
    except ConfigError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise ckpt.CheckpointError(
            f"checkpoint {path} does not fit the model it was saved from ({ckpt.first_sentence(e)})"
        ) from e


def open_run_dir(
    run_dir: Path, env: distributed.DistEnv, train_set: Dataset, restore: Callable[[Path], None]
) -> Path | None:
    """Restore the newest usable checkpoint of ``run_dir`` with ``restore``, if any (rank 0
    first, the other ranks after it); rank 0 then makes the folder and drops the temp files of
    a killed write. Returns the checkpoint restored."""
    if not env.is_main:  # rank 0 tidies the run dir and resumes first, then the rest
        distributed.barrier(env)
        return ckpt.restore_latest(run_dir, restore)
    restored = ckpt.restore_latest(run_dir, restore)
    if restored is not None:  # the folder must still be split as the run's start recorded
        check_run_dataset(run_dir, train_set)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt.remove_stale_temp(ckpt.checkpoint_dir(run_dir))
    except OSError as e:
        raise ckpt.CheckpointWriteError(
            e.errno, f"cannot write the run directory {run_dir}: {e.strerror or e}"
        ) from e
    if stale:
        print(f"removed {len(stale)} partial checkpoint(s) of a killed run", file=sys.stderr)
    return restored


def record_start(
    run_dir: Path,
    cfg: Config,
    train_set: Dataset,
    step: int,
    restored: Path | None,
    changes: list[recipe.Change],
) -> None:
    """Rank 0's records of a (re)start at ``step``. A new run writes ``config.yaml`` and the
    dataset record; a resume never rewrites them (the recipe the run started with) and appends
    the ``changes`` it was allowed to make to ``config_history.yaml``."""
    truncate_after(run_dir, step)  # also on a fresh start: a run killed before its checkpoint
    config_path = run_dir / "config.yaml"
    if restored is None or not config_path.is_file():
        config_text = dump_yaml(cfg).encode()
        ckpt.atomic_write(config_path, lambda f: f.write(config_text), "config")
    if restored is None or not (run_dir / DATASET_RECORD).is_file():
        write_run_dataset(run_dir, train_set)
    if changes:
        recipe.append_history(run_dir, recipe.history_entry(step, changes, restored))


def write(run_dir: Path, state: dict, keep_every: int) -> None:
    """``checkpoints/last.pt``, and ``step_<step>.pt`` every ``keep_every`` steps."""
    directory = ckpt.checkpoint_dir(run_dir)
    ckpt.atomic_save(state, directory / ckpt.LAST)
    if keep_every and state["step"] % keep_every == 0:
        ckpt.atomic_save(state, directory / f"step_{state['step']:08d}.pt")


def last_path(run_dir: Path) -> Path:
    return ckpt.checkpoint_dir(run_dir) / ckpt.LAST


def last_good(run_dir: Path, saved_step: int | None) -> str:
    """Where the newest complete checkpoint of this run is, for error messages."""
    if saved_step is None:
        return "no checkpoint was written by this run yet"
    return f"the last good checkpoint {last_path(run_dir)} (step {saved_step}), left untouched"
