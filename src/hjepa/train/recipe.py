"""What a resume may change: the resolved config against the one a checkpoint was trained with.

A run dir is one recipe. Re-running ``hjepa train`` on it continues that recipe, so the config
of this invocation is compared with the checkpoint's (passed through the schema first, so keys
added to the schema since then take their defaults instead of counting as a change):

* keys in :data:`RUN_ONLY_KEYS` (or under a prefix of :data:`RUN_ONLY_PREFIXES`) say how this
  invocation runs, logs or is probed, never what it computes; they may differ freely;
* ``run.dir`` is the run's identity, never a difference (a run dir may be moved or copied);
* any other difference is refused (:class:`RecipeChangeError`, one line naming each key with its
  old and new value) unless the caller allows it explicitly (``--allow-config-change``); an
  allowed change is appended to ``config_history.yaml`` and logged as a ``config_change``
  record in ``metrics.jsonl``. ``config.yaml`` keeps the recipe the run started with.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

import yaml

from hjepa.config import NATIVE_CHANNELS, Config, ConfigError, from_dict

# Keys that cannot change what a step computes. Why each is safe:
RUN_ONLY_KEYS = (
    "run.checkpoint_every",  # when last.pt is rewritten
    "run.keep_every",  # which periodic checkpoints are kept
    "run.tensorboard",  # a second log sink
    "run.progress",  # the terminal bar
    "train.stop_after",  # where this invocation ends; the schedule is the full run's
    "train.log_every",  # how often losses are written
    "train.knn_every",  # online probes read the target encoder; they draw from no train RNG
    "train.knn_bank_size",  # online probe only
    "train.knn_query_size",  # online probe only
    "train.device",  # same recipe elsewhere (rounding differs; bit-identity needs the same one)
    "train.num_workers",  # decoding processes; the data order comes from (seed, epoch)
    "train.threads",  # intra-op threads
    "train.compile",  # the same modules, compiled in place
    "train.nonfinite",  # only acts on a NaN/inf step, which 'stop' would not have continued
    "model.attention",  # SDPA kernel choice: the same attention, other rounding
    "model.grad_checkpointing",  # recomputes the same forward in backward
)
RUN_ONLY_PREFIXES = ("eval.",)  # evaluation and the online probe only; never a training step
IDENTITY_KEYS = ("run.dir",)
# Keys whose change no flag can carry over: the checkpoint's weights do not fit the new model.
# (model.* except the settings that leave every parameter shape as it was.)
SHAPE_FREE_MODEL_KEYS = (
    "model.drop_path",
    "model.normalize_targets",
    "model.predictor_mode",
    "model.target_stop_grad",
    "model.attention",
    "model.grad_checkpointing",
)
ARCH_KEYS_EXTRA = ("data.name", "data.image_size", "data.channels")
# Starting weights are read once, by a new run: on an existing run they cannot act.
NEW_RUN_ONLY_KEYS = ("train.init_from",)

HISTORY = "config_history.yaml"
FLAG = "--allow-config-change"


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


class RecipeChangeError(ConfigError):
    """A resume whose config changes what the run computes; nothing on disk was touched."""


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_run_only(key: str) -> bool:
    return key in RUN_ONLY_KEYS or key.startswith(RUN_ONLY_PREFIXES)


def is_architecture(key: str) -> bool:
    return key in ARCH_KEYS_EXTRA or (key.startswith("model.") and key not in SHAPE_FREE_MODEL_KEYS)


def config_diff(stored: dict[str, Any], current: Config) -> list[Change]:
    """Every key whose value differs, ``run.dir`` excluded, in schema order.

    ``stored`` goes through the schema first: a checkpoint written before a key existed gets
    that key's default, so only real changes are listed.
    """
    old = _flat(from_dict(stored).to_dict())
    new = _flat(current.to_dict())
    if old["data.name"] == new["data.name"] in NATIVE_CHANNELS:
        # data.channels cannot act on these: runs before data.channels=0 recorded 1 for all.
        old["data.channels"] = new["data.channels"]
    return [
        Change(key, old[key], new[key])
        for key in new
        if key not in IDENTITY_KEYS and old.get(key) != new[key]
    ]


def split(changes: list[Change]) -> tuple[list[Change], list[Change]]:
    """(run-only changes, recipe changes)."""
    run_only = [c for c in changes if is_run_only(c.key)]
    return run_only, [c for c in changes if not is_run_only(c.key)]


def check_resume(
    stored: dict[str, Any], current: Config, where: str | Path, allow: bool = False
) -> tuple[list[Change], list[Change]]:
    """``(run_only, recipe)`` changes of resuming the run in ``where`` with ``current``.

    Raises :class:`RecipeChangeError` for recipe changes unless ``allow``; even when allowed, a
    change of the architecture (the weights would not fit) or of ``train.init_from`` is refused.
    """
    changes = config_diff(stored, current)
    # Leaving train.init_from out of a resume is no change: the run goes on from its own
    # checkpoint either way (the caller keeps the stored value in the run's record).
    changes = [c for c in changes if not (c.key in NEW_RUN_ONLY_KEYS and c.new == "")]
    run_only, recipe = split(changes)
    if not recipe:
        return run_only, recipe
    listed = ", ".join(map(str, recipe))
    arch = [c for c in recipe if is_architecture(c.key)]
    if arch:
        raise RecipeChangeError(
            f"{where} holds a run of a different architecture ({', '.join(map(str, arch))}): "
            "its weights cannot continue under this config; use a new run.dir (with "
            f"train.init_from={where} to start from its encoder weights)"
        )
    fresh = [c for c in recipe if c.key in NEW_RUN_ONLY_KEYS]
    if fresh:
        raise RecipeChangeError(
            f"{where} already holds a run, so {fresh[0]} cannot act (train.init_from only "
            "sets the starting weights of a new run): use a new run.dir"
        )
    if not allow:
        raise RecipeChangeError(
            f"{where} holds a run trained with a different recipe ({listed}); use a new "
            f"run.dir, or pass {FLAG} (Python: allow_config_change=True) to continue this run "
            f"with the change, recorded in {HISTORY} and metrics.jsonl"
        )
    return run_only, recipe


def history_entry(step: int, changes: list[Change], checkpoint: str | Path) -> dict[str, Any]:
    """One record of an allowed change: when, from which checkpoint, and old/new per key."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {
        "step": step,
        "time": now,
        "checkpoint": str(checkpoint),
        "changes": {c.key: {"old": c.old, "new": c.new} for c in changes},
    }


def append_history(run_dir: str | Path, entry: dict[str, Any]) -> Path:
    """Append ``entry`` to ``RUN/config_history.yaml`` (a YAML list), atomically."""
    from hjepa.checkpoint import atomic_write  # torch: imported only when writing

    path = Path(run_dir) / HISTORY
    entries = read_history(run_dir)
    text = yaml.safe_dump([*entries, entry], sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text), "config history")
    return path


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    entries = yaml.safe_load(path.read_text()) or []
    if not isinstance(entries, list):
        raise ConfigError(f"{path} must be a YAML list of changes; move it aside")
    return entries
