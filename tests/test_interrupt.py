"""SIGINT / SIGTERM: finish the step, save, one line, exit 128 + signal; the resumed run is
bit-identical to one never interrupted, and a second signal cannot break the save."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hjepa import checkpoint as ckpt
from hjepa.config import load_config
from hjepa.train.interrupt import StopSignals, TrainingInterrupted
from hjepa.train.logging import read_metrics
from hjepa.train.trainer import Trainer
from tests.conftest import TINY

ARGS = [*TINY, "train.max_steps=20", "run.checkpoint_every=100", "train.threads=1"]


def test_stop_signals_record_the_first_signal_and_ignore_later_ones(capfd):
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGTERM)  # no exception, no exit: only recorded
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGTERM and stop.agreed() == signal.SIGTERM
    assert "SIGINT ignored: already stopping" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is previous  # handlers put back
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs at the next bytecode


def test_interrupted_exit_codes_and_message():
    stop = TrainingInterrupted(signal.SIGTERM, 7, 20, Path("r/checkpoints/last.pt"))
    assert stop.exit_code == 143 and isinstance(stop, KeyboardInterrupt)
    assert stop.describe() == "stopped by SIGTERM after step 7/20; checkpoint r/checkpoints/last.pt"
    assert TrainingInterrupted(signal.SIGINT, 0, 20, None).exit_code == 130


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("interrupt") / "reference"
    torch.set_num_threads(1)
    Trainer(load_config("quickstart", [*ARGS, f"run.dir={run}"])).fit()
    return run


def _start(run: Path, log: Path, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hjepa", "train", "--config", "quickstart", *ARGS]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    with log.open("w") as f:
        return subprocess.Popen([*cmd, f"run.dir={run}"], env=environ, stdout=f, stderr=f)


def _wait(proc: subprocess.Popen, condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("training ended or stalled before the signal could be sent")
        time.sleep(0.002)


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run, "train")]


def _assert_same_run(run: Path, reference: Path) -> None:
    a, b = (
        ckpt.load_checkpoint(run / "checkpoints/last.pt"),
        ckpt.load_checkpoint(reference / "checkpoints/last.pt"),
    )
    assert a["step"] == b["step"] == 20
    for part in ("context_encoder", "target_encoder", "predictor", "heads"):
        for key, value in b[part].items():
            assert torch.equal(a[part][key], value), f"{part}.{key}"
    for i, state in b["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(a["optimizer"]["state"][i][key], value), f"optimizer {i}.{key}"
    losses = {r["step"]: r["loss"] for r in read_metrics(run, "train")}
    assert _steps(run) == list(range(1, 21))  # no step missing or repeated
    assert losses == {r["step"]: r["loss"] for r in read_metrics(reference, "train")}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_the_step_exits_128_plus_signal_and_resumes_bit_identical(
    reference, tmp_path, sig
):
    run, log = tmp_path / "run", tmp_path / "cli.log"
    proc = _start(run, log)
    _wait(proc, lambda: max(_steps(run), default=0) >= 3)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 128 + sig
    out = log.read_text()
    assert "Traceback" not in out
    step = ckpt.load_checkpoint(run / "checkpoints/last.pt")["step"]
    assert 3 <= step < 20  # saved by the stop: checkpoint_every=100 writes none before step 20
    assert _steps(run) == list(range(1, step + 1))  # the last step logged is the one saved
    (line,) = [x for x in out.splitlines() if x.startswith("hjepa train:")]
    name = signal.Signals(sig).name
    assert line.startswith(f"hjepa train: stopped by {name} after step {step}/20; checkpoint ")
    assert f"{run}/checkpoints/last.pt; resume with: hjepa train --config quickstart" in line
    assert line.endswith(f"run.dir={run}")
    Trainer(load_config("quickstart", [*ARGS, f"run.dir={run}"])).fit()
    _assert_same_run(run, reference)


@pytest.mark.slow
def test_more_signals_while_saving_are_ignored_until_the_checkpoint_is_in_place(
    reference, tmp_path
):
    run, log = tmp_path / "run", tmp_path / "cli.log"
    proc = _start(run, log, **{ckpt.PAUSE_ENV: "1.0"})  # every write pauses half-written
    _wait(proc, lambda: max(_steps(run), default=0) >= 3)
    proc.send_signal(signal.SIGINT)
    ckpts = run / "checkpoints"
    _wait(proc, lambda: bool(list(ckpts.glob(".last.pt.*.tmp"))))  # the stop's save, mid-write
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130  # the first signal's code, after the save finished
    out = log.read_text()
    assert "Traceback" not in out
    assert "SIGINT ignored" in out and "SIGTERM ignored" in out
    assert not list(ckpts.glob(".*.tmp"))
    step = ckpt.load_checkpoint(ckpts / "last.pt")["step"]  # complete, loadable
    assert _steps(run) == list(range(1, step + 1))
    Trainer(load_config("quickstart", [*ARGS, f"run.dir={run}"])).fit()
    _assert_same_run(run, reference)


DDP_ARGS = [*ARGS, "train.batch_size=16", "train.device=cpu", "train.knn_bank_size=32"]


def _signalled_rank(rank: int, world: int, port: int, run_dir: str) -> None:
    """A torchrun-style rank of the real command line; rank 1 alone gets SIGTERM mid-run."""
    import threading

    from hjepa.cli import main

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    sys.stderr = open(f"{run_dir}.rank{rank}.err", "w")  # noqa: SIM115 (closed at exit)

    def preempt() -> None:  # after rank 0 logged step 3
        while max(_steps(Path(run_dir)), default=0) < 3:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    if rank == 1:
        threading.Thread(target=preempt, daemon=True).start()
    code = main(["train", "--config", "quickstart", *DDP_ARGS, f"run.dir={run_dir}"])
    sys.stderr.flush()
    assert code == 143, code  # rank 0 too: it stops at the step the ranks agreed on


@pytest.mark.slow
def test_a_signal_to_one_ddp_rank_stops_every_rank_after_the_same_step(tmp_path, run_ranks):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp"
    run_ranks(_signalled_rank, (2, port, str(run)), nprocs=2, start_method="spawn")
    errors = [(tmp_path / f"ddp.rank{r}.err").read_text() for r in range(2)]
    step = ckpt.load_checkpoint(run / "checkpoints/last.pt")["step"]
    assert 3 <= step < 20 and _steps(run) == list(range(1, step + 1))
    assert f"stopped by SIGTERM after step {step}/20" in errors[0]  # rank 0 reports, once
    assert "stopped by" not in errors[1] and "Traceback" not in errors[0] + errors[1]
