"""Faults during training: kill -9, corrupt and hostile checkpoints, NaN/inf, full or unwritable
disks. Each test injects the fault and checks what the run does and what is left on disk."""

import errno
import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hjepa import checkpoint as ckpt
from hjepa.cli import main
from hjepa.config import dump_yaml, load_config
from hjepa.export import ExportError, export_run, load_exported_encoder
from hjepa.losses.sigreg import SIGReg
from hjepa.models.hjepa import build_encoder
from hjepa.train.logging import read_metrics
from hjepa.train.trainer import NonFiniteLossError, Trainer
from tests.conftest import TINY
from tests.state import checkpoint_tensors


def _assert_same_tensors(a: dict, b: dict) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def _last(run: Path) -> dict:
    return ckpt.load_checkpoint(run / "checkpoints" / ckpt.LAST)


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run, "train")]


# -- 1. kill -9 --------------------------------------------------------------------------------

KILL_ARGS = ["train.max_steps=10", "run.checkpoint_every=1", "train.threads=1"]


class _CliRun:
    """``python -m hjepa train`` in a subprocess (pays the import of torch: a few seconds)."""

    def __init__(self, run: Path, cwd: Path, env_extra: dict[str, str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
        cmd = [sys.executable, "-m", "hjepa", "train", "--config", "quickstart", *TINY]
        cmd += [f"run.dir={run}", *KILL_ARGS]
        with (cwd / "cli.log").open("a") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=log)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class _ForkedRun:
    """The same training in a forked child of this process (torch already imported)."""

    def __init__(self, run: Path):
        def train() -> None:
            Trainer(load_config("quickstart", [*TINY, f"run.dir={run}", *KILL_ARGS])).fit()

        self.proc = multiprocessing.get_context("fork").Process(target=train, daemon=True)
        self.proc.start()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join()


def _wait_for(proc, condition, timeout: float = 300.0) -> bool:
    """Poll ``condition()`` every 2 ms; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not proc.alive():
            return bool(condition())
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the training process neither reached the kill point nor ended")


@pytest.mark.slow
def test_kill_9_mid_training_resumes_bit_identical(tmp_path):
    rng = random.Random(0)
    ref_dir, run = tmp_path / "reference", tmp_path / "killed"
    Trainer(load_config("quickstart", [*TINY, f"run.dir={ref_dir}", *KILL_ARGS])).fit()
    ckpts = run / "checkpoints"

    # Kill 1 (the CLI): during the k-th checkpoint write, half of its temp file on disk.
    k = rng.randint(3, 5)
    proc = _CliRun(run, tmp_path, {ckpt.PAUSE_ENV: "0.3"})
    seen: set[str] = set()

    def kth_temp_file_exists() -> bool:
        seen.update(p.name for p in ckpts.glob(".*.tmp"))
        return len(seen) >= k

    assert _wait_for(proc, kth_temp_file_exists)
    proc.kill()
    partial = list(ckpts.glob(".*.tmp"))
    assert len(partial) == 1
    with pytest.raises(ckpt.CheckpointError):  # a half-written file: never a checkpoint
        ckpt.load_checkpoint(partial[0])
    assert _last(run)["step"] == k - 1  # the previous complete checkpoint is intact

    # Kill 2: at a random moment (mid-step, mid-log or mid-save) after the restart progressed.
    proc = _ForkedRun(run)
    assert _wait_for(proc, lambda: max(_train_steps(run), default=0) > k)
    assert not partial[0].exists()  # the restart removed the killed writer's temp file
    time.sleep(rng.uniform(0.0, 0.1))
    proc.kill()

    # The last restart runs to the end, on the same run dir.
    trainer = Trainer(load_config("quickstart", [*TINY, f"run.dir={run}", *KILL_ARGS]))
    trainer.fit()
    assert trainer.step == 10
    _assert_same_tensors(_last(run), _last(ref_dir))
    assert not list(ckpts.glob(".*.tmp"))
    losses = {r["step"]: r["loss"] for r in read_metrics(run, "train")}
    assert _train_steps(run) == list(range(1, 11))  # no duplicate or missing step
    assert losses == {r["step"]: r["loss"] for r in read_metrics(ref_dir, "train")}


def test_stale_partial_files_are_removed_and_never_loaded(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config("train.max_steps=4", "train.stop_after=2")).fit()
    good = (run / "checkpoints/last.pt").read_bytes()
    # What writers killed mid-write leave: a truncated temp file and one of random bytes.
    (run / "checkpoints/.last.pt.abc123.tmp").write_bytes(good[: len(good) // 3])
    (run / "checkpoints/.step_00000004.pt.x.tmp").write_bytes(os.urandom(500))
    # ... and a metrics line cut short.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "kind": "tra')
    trainer = Trainer(tiny_config("train.max_steps=4"))
    trainer.fit()
    assert "removed 2 partial checkpoint(s)" in capsys.readouterr().err
    assert trainer.step == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert _train_steps(run) == [1, 2, 3, 4]


def test_fresh_start_drops_metrics_of_a_run_killed_before_its_first_checkpoint(
    tiny_config, tmp_path
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 9.0}\n')
    Trainer(tiny_config("train.max_steps=2")).fit()
    assert _train_steps(run) == [1, 2]
    assert 9.0 not in [r["loss"] for r in read_metrics(run, "train")]


# -- 2. corrupt checkpoints -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped at step 5 of 6, with last.pt (5) and periodic step_2.pt and step_4.pt."""
    base = tmp_path_factory.mktemp("stopped")
    args = [*TINY, "train.max_steps=6", "run.checkpoint_every=1", "run.keep_every=2"]
    torch.set_num_threads(1)
    Trainer(load_config(None, [*args, f"run.dir={base / 'full'}"])).fit()
    Trainer(load_config(None, [*args, "train.stop_after=5", f"run.dir={base / 'run'}"])).fit()
    return base, args


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _wrong_shape(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    w = state["predictor"]["embed.weight"]
    state["predictor"]["embed.weight"] = torch.zeros(w.shape[0] + 1, w.shape[1])
    torch.save(state, path)


def _invalid_config(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["config"]["train"]["batch_size"] = -3
    torch.save(state, path)


@pytest.mark.parametrize("damage", [_truncate, _random_bytes, _wrong_shape, _invalid_config])
def test_corrupt_last_falls_back_to_the_newest_periodic_checkpoint(stopped_run, tmp_path, damage):
    base, args = stopped_run
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    last = run / "checkpoints/last.pt"
    damage(last)
    damaged = last.read_bytes()
    trainer = Trainer(load_config(None, [*args, f"run.dir={run}"]))
    with pytest.warns(ckpt.CheckpointWarning) as record:
        trainer.fit()
    message = str(record[0].message)
    assert str(last) in message and "step_00000004.pt" in message  # names both files
    assert "last.pt -> last.pt.corrupt" in message
    assert (run / "checkpoints/last.pt.corrupt").read_bytes() == damaged  # moved, not deleted
    assert _train_steps(run) == [1, 2, 3, 4, 5, 6]  # metrics cut back to step 4, then redone
    # Resuming from step 4 repeats the uninterrupted run exactly.
    _assert_same_tensors(_last(run), _last(base / "full"))


def test_corrupt_checkpoints_without_a_usable_fallback_stop_with_the_file_named(
    stopped_run, tmp_path, capsys
):
    base, args = stopped_run
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    files = sorted((run / "checkpoints").iterdir())
    for path in files:
        _truncate(path)
    before = {p.name: p.read_bytes() for p in files}
    assert main(["train", "--config", "quickstart", *args, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hjepa train: error: checkpoint ")
    for name in ("last.pt", "step_00000004.pt", "step_00000002.pt"):
        assert name in err
    # Nothing was renamed, overwritten or deleted.
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_corrupt_last_without_periodic_checkpoints_says_how_to_keep_some(tiny_config, tmp_path):
    Trainer(tiny_config("train.max_steps=2")).fit()
    last = tmp_path / "run/checkpoints/last.pt"
    _random_bytes(last)
    with pytest.raises(ckpt.CheckpointError, match=r"last\.pt.*run\.keep_every"):
        Trainer(tiny_config("train.max_steps=3")).fit()
    assert last.is_file()


# -- 3. hostile checkpoints and export --------------------------------------------------------


class _MakesDirectory:
    """Unpickling this runs ``os.mkdir(path)``: code execution from a 'checkpoint'."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_hostile_pickle_is_refused_and_its_code_never_runs(tiny_config, tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_MakesDirectory(proof)))
    assert proof.is_dir()  # the payload really executes code when unpickled the unsafe way

    marker = tmp_path / "pwned"
    hostile = {"step": 7, "config": {}, "x": _MakesDirectory(marker)}
    run_ckpts = tmp_path / "run/checkpoints"
    run_ckpts.mkdir(parents=True)
    torch.save(hostile, run_ckpts / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="last.pt"):
        ckpt.load_checkpoint(run_ckpts / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="last.pt"):
        Trainer(tiny_config("train.max_steps=1")).fit()
    (tmp_path / "run/config.yaml").write_text(dump_yaml(tiny_config()))
    assert main(["eval", str(tmp_path / "run")]) == 2  # eval refuses it too
    assert not marker.exists()


@pytest.mark.parametrize("arch", [(), ("model.pos_embed=rope", "model.layer_scale=0.1")])
def test_export_round_trip_rebuilds_the_target_encoder(tiny_config, tmp_path, capsys, arch):
    run = tmp_path / "run"
    Trainer(tiny_config("train.max_steps=2", *arch)).fit()
    out = tmp_path / "share/enc.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["step"] == 2 and card["in_channels"] == 1 and card["image_size"] == 32
    assert card["config"]["run"]["dir"] == ""  # no local paths in a shared card
    encoder = load_exported_encoder(out)
    state = _last(run)["target_encoder"]
    assert encoder.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(encoder.state_dict()[key], value), key
    cfg = tiny_config(*arch)
    reference = build_encoder(cfg.model, 32, 1)
    reference.load_state_dict(state)
    images = torch.randn(3, 1, 32, 32)
    assert torch.equal(encoder(images), reference.eval()(images))
    # The default location, and the .json path works as well as the weights path.
    weights, card_file = export_run(run)
    assert weights == run / "encoder.safetensors" and card_file == run / "encoder.json"
    assert torch.equal(load_exported_encoder(card_file)(images), encoder(images))


def test_export_detects_damaged_or_mismatched_files(tiny_config, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config("train.max_steps=1")).fit()
    weights, card_file = export_run(run)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="SHA-256"):
        load_exported_encoder(weights)
    weights, card_file = export_run(run)
    card = json.loads(card_file.read_text())
    card["config"]["model"]["depth"] = 3  # a card that does not describe these weights
    card_file.write_text(json.dumps(card))
    with pytest.raises(ExportError, match="does not fit"):
        load_exported_encoder(weights)


# -- 4. NaN / inf ----------------------------------------------------------------------------


def _poison_forward(trainer: Trainer, at_steps: set[int]) -> None:
    """At the given (0-based) steps, make the level-1 predictions NaN."""
    forward = trainer.model.forward

    def poisoned(images, masks, *views):
        out = forward(images, masks, *views)
        if trainer.step in at_steps:
            out.predictions[1] = out.predictions[1] * float("nan")
        return out

    trainer.model.forward = poisoned


def test_nan_in_one_level_stops_with_the_step_and_term_and_keeps_the_checkpoint(
    tiny_config, tmp_path
):
    args = ["train.max_steps=6", "run.checkpoint_every=1"]
    Trainer(tiny_config(*args, "train.stop_after=2", f"run.dir={tmp_path / 'clean'}")).fit()
    trainer = Trainer(tiny_config(*args))
    _poison_forward(trainer, {2})
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "non-finite loss (loss_level1=nan)" in message and "at step 3" in message
    assert "loss_level0" not in message and "\n" not in message
    assert "last.pt (step 2), left untouched" in message
    _assert_same_tensors(_last(tmp_path / "run"), _last(tmp_path / "clean"))
    assert _train_steps(tmp_path / "run") == [1, 2]


def test_cli_reports_a_nan_stop_in_one_line(tmp_path, monkeypatch, capsys):
    import hjepa.losses.combined as objective_module  # the trainer's loss goes through it

    real = objective_module.prediction_loss

    def nan_in_level1(*args, **kwargs):
        loss, per_level = real(*args, **kwargs)
        per_level = [per_level[0], per_level[1] * float("nan"), *per_level[2:]]
        return loss + per_level[1], per_level

    monkeypatch.setattr(objective_module, "prediction_loss", nan_in_level1)
    run = tmp_path / "run"
    assert main(["train", "--config", "quickstart", *TINY, f"run.dir={run}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("hjepa train: error: non-finite loss (loss_level1=nan) at step 1;")
    assert "no checkpoint was written by this run yet" in err and "train.nonfinite=skip" in err
    assert not (run / "checkpoints").exists()


def test_inf_regularizer_is_named(tiny_config, monkeypatch):
    monkeypatch.setattr(SIGReg, "forward", lambda *a, **k: torch.tensor(float("inf")))
    trainer = Trainer(tiny_config("train.max_steps=3", "loss.regularizer=sigreg"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(sigreg=inf\) at step 1"):
        trainer.fit()


def test_nan_gradient_with_a_finite_loss_stops(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.max_steps=4", "run.checkpoint_every=1"))
    weight = trainer.model.context_encoder.patch_embed.weight
    weight.register_hook(lambda g: g * float("nan") if trainer.step == 1 else g)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient .* from a finite loss") as e:
        trainer.fit()
    assert "at step 2" in str(e.value)
    assert _last(tmp_path / "run")["step"] == 1
    assert torch.isfinite(_last(tmp_path / "run")["context_encoder"]["patch_embed.weight"]).all()


def test_skip_mode_skips_update_and_ema_counts_and_continues(tiny_config, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config("train.max_steps=5", "train.nonfinite=skip"))
    trainer.model.train()
    batches = trainer.step_batches()
    objective = trainer.objective.forward

    def poisoned(out, step):  # one NaN term, a finite loss and gradient
        loss, terms = objective(out, step=step)
        return loss, {**terms, "loss_level1": terms["loss_level1"] * float("nan")}

    monkeypatch.setattr(trainer.objective, "forward", poisoned)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train_step(next(batches))
    assert trainer.step == 1 and trainer.skipped_steps == 1  # counted, schedules move on
    assert "loss_level1=nan" in result.skip_reason
    for key, value in trainer.model.state_dict().items():  # no update, no EMA
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in trainer.params)  # the poisoned gradient is dropped
    monkeypatch.undo()
    result = trainer.train_step(next(batches))  # a finite step goes through again
    assert trainer.step == 2 and trainer.skipped_steps == 1 and result.skip_reason is None
    after = trainer.model.state_dict()
    for part in ("context_encoder", "target_encoder"):
        assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith(part))


def test_skip_mode_end_to_end_logs_and_resumes(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config("train.max_steps=5", "train.nonfinite=skip"))
    _poison_forward(trainer, {1, 3})
    last = trainer.fit()
    assert trainer.step == 5 and trainer.skipped_steps == 2 and last["skipped_steps"] == 2
    events = read_metrics(run, "nonfinite")
    assert [(e["step"], e["skipped_steps"]) for e in events] == [(2, 1), (4, 2)]
    assert "loss_level1=nan" in events[0]["reason"]
    assert "step 2: skipped, non-finite loss" in capsys.readouterr().err
    state = _last(run)
    assert state["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint_tensors(state).values())


def test_weights_that_overflow_are_never_saved(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.max_steps=4", "run.checkpoint_every=1"))
    step = trainer.optimizer.step

    def overflowing_step(*a, **k):
        out = step(*a, **k)
        if trainer.step == 2:
            trainer.model.predictor.embed.weight.data.fill_(float("inf"))
        return out

    trainer.optimizer.step = overflowing_step
    with pytest.raises(NonFiniteLossError, match="weights became non-finite at step 3"):
        trainer.fit()
    assert _last(tmp_path / "run")["step"] == 2


# -- 6. full disk, unwritable run dir -------------------------------------------------------


def test_disk_full_gives_a_clear_error_and_keeps_the_previous_checkpoint(
    tiny_config, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    cli = ["train", "--config", "quickstart", *TINY, f"run.dir={run}", "train.max_steps=4"]
    assert main([*cli, "train.stop_after=2"]) == 0
    good = (run / "checkpoints/last.pt").read_bytes()
    save = torch.save

    def full_disk(obj, f, *a, **k):
        save(obj, f, *a, **k)  # write as much as torch would, then hit the limit
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    assert main(cli) == 1
    # The tiny model's final probe may also warn of collapse (train/monitor.py), on its own line.
    err = "".join(
        line for line in capsys.readouterr().err.splitlines(True) if not line.startswith("WARNING:")
    )
    assert err.count("\n") == 1
    assert f"cannot write checkpoint to {run}/checkpoints/last.pt: No space left on device" in err
    assert (run / "checkpoints/last.pt").read_bytes() == good
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A run dir that cannot be created: in a read-only dir, or (as root, where chmod does
    not stop writes) under a regular file."""
    if os.geteuid() != 0:
        parent = tmp_path / "readonly"
        parent.mkdir()
        parent.chmod(0o500)
        yield parent / "run"
        parent.chmod(0o700)
    else:
        (tmp_path / "file").write_text("not a directory")
        yield tmp_path / "file/run"


def test_unwritable_run_dir_fails_before_training(unwritable, capsys):
    rc = main(["train", "--config", "quickstart", *TINY, f"run.dir={unwritable}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot write the run directory {unwritable}: " in err
    assert "Permission denied" in err or "Not a directory" in err


def test_read_only_checkpoint_dir_keeps_the_previous_checkpoint(tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(tiny_config("train.max_steps=3", "train.stop_after=1")).fit()
    good = (run / "checkpoints/last.pt").read_bytes()

    mkstemp = ckpt.tempfile.mkstemp

    def read_only(*a, prefix="", **k):  # the checkpoints dir only: config.yaml still writes
        if prefix.startswith(".last.pt"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return mkstemp(*a, prefix=prefix, **k)

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", read_only)
    with pytest.raises(ckpt.CheckpointWriteError, match="cannot write checkpoint to .*: Perm"):
        Trainer(tiny_config("train.max_steps=3")).fit()
    assert (run / "checkpoints/last.pt").read_bytes() == good
