"""A run directory keeps the periodic checkpoints it is asked to, writes files a lab can share
(the user's umask) and gives TensorBoard one value per step after a resume."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from hjepa.cli import main
from hjepa.config import ConfigError, from_dict, load_config
from hjepa.export import export_run
from hjepa.train.logging import read_metrics
from hjepa.train.trainer import Trainer
from tests.conftest import TINY

# -- periodic checkpoints ---------------------------------------------------------------------


def test_keep_every_that_no_checkpoint_step_meets_is_refused_with_the_multiples():
    with pytest.raises(ConfigError, match=r"run.keep_every=7 is not a multiple of .*=5.*10"):
        load_config(None, [*TINY, "run.keep_every=7", "run.checkpoint_every=5"])
    cfg = load_config(None, [*TINY, "run.keep_every=10", "run.checkpoint_every=5"])
    # A config stored by an older run is read as written (its run dir must stay usable).
    tree = cfg.to_dict()
    tree["run"]["keep_every"] = 7
    assert from_dict(tree).run.keep_every == 7


# -- file modes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_run_files_and_exports_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        Trainer(load_config(None, [*TINY, f"run.dir={run}", "train.max_steps=1"])).fit()
        weights, card = export_run(run)
        out = tmp_path / "rows.npz"
        assert (
            main(["extract", str(run), "--split", "test", "--out", str(out), "--no-progress"]) == 0
        )
    finally:
        os.umask(old)
    for path in (run / "config.yaml", run / "checkpoints/last.pt", weights, card, out):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path


# -- TensorBoard after a resume ---------------------------------------------------------------


def _tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [scalar.step for scalar in events.Scalars(tag)]


def test_tensorboard_keeps_one_value_per_step_after_a_resume(tmp_path):
    run = tmp_path / "run"

    def cfg(*extra):
        return load_config(
            None, [*TINY, f"run.dir={run}", "train.max_steps=6", "run.tensorboard=true", *extra]
        )

    Trainer(cfg("train.stop_after=3")).fit()
    at_three = (run / "checkpoints/last.pt").read_bytes()
    Trainer(cfg("train.stop_after=2")).fit()  # logs steps 4 and 5 ...
    (run / "checkpoints/last.pt").write_bytes(at_three)  # ... then "dies" before its checkpoint
    time.sleep(1.1)  # event files are named by the second they were opened in
    Trainer(cfg()).fit()  # resumes from step 3: steps 4 and 5 again, then 6
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4, 5, 6]
    assert _tensorboard_steps(run, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert np.isfinite([r["loss"] for r in read_metrics(run, "train")]).all()
