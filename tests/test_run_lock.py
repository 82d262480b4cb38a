"""One writer per run directory: a second trainer on a live run is refused naming the first, a
killed trainer's lock is taken over, and without flock the pid on this host decides."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hjepa import runlock
from hjepa.checkpoint import PAUSE_ENV
from hjepa.cli import main
from hjepa.train.logging import read_metrics
from tests.conftest import TINY


def _wait(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the first trainer ended before it held the run dir"
        assert time.monotonic() < deadline, "the first trainer never took the run dir"
        time.sleep(0.05)


def test_a_second_trainer_on_a_live_run_is_refused_and_a_killed_ones_lock_taken_over(
    tmp_path, capsys
):
    run = tmp_path / "run"
    args = ["train", *TINY, f"run.dir={run}", "train.max_steps=3"]
    # The first trainer holds still while writing its config: it owns the run dir meanwhile.
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: "120"}
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen([sys.executable, "-m", "hjepa", *args], env=env, stderr=log)
    try:
        _wait(lambda: any(run.glob(".config.yaml.*.tmp")), first)
        before = sorted(p.name for p in run.iterdir())
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"is being trained by pid {first.pid} on {socket.gethostname()}" in err
        assert "or train into another run.dir" in err
        assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 left its lock file: stale, so the next trainer takes it over and says whose.
    assert json.loads((run / runlock.LOCK).read_text())["pid"] == first.pid
    assert main(args) == 0
    assert f"took over the lock of pid {first.pid}" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3]
    assert not (run / runlock.LOCK).exists()  # a clean end leaves no lock behind


def test_without_flock_a_live_pid_on_this_host_owns_the_run_dir(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {**runlock.holder_record(), "pid": sleeper.pid}
        (run / runlock.LOCK).write_text(json.dumps(record))
        with pytest.raises(runlock.RunDirBusy, match=f"pid {sleeper.pid}"):
            runlock.acquire(run)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = runlock.acquire(run)  # its holder is gone: taken over
    assert lock.previous["pid"] == sleeper.pid and "no longer running" in lock.took_over()
    assert json.loads((run / runlock.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    # A lock written on another host cannot be judged from here: refused, naming the file.
    (run / runlock.LOCK).write_text(json.dumps({**record, "host": "elsewhere"}))
    with pytest.raises(runlock.RunDirBusy, match=f"delete {run / runlock.LOCK}"):
        runlock.acquire(run)
