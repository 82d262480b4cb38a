"""What a run directory records per invocation (hjepa.rundir), and the training terminal."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import torch

import hjepa
from hjepa.rundir import command_line, git_commit, read_invocations
from hjepa.train import console
from hjepa.train.logging import read_metrics
from hjepa.train.trainer import train


def test_run_dir_records_every_invocation(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=4", "train.stop_after=2")
    train(cfg)
    config_text = (tmp_path / "run" / "config.yaml").read_text()
    train(tiny_config("train.max_steps=4", "train.stop_after=2"))  # resumes at step 2
    records = read_invocations(tmp_path / "run")
    assert [r["start_step"] for r in records] == [0, 2]
    for r in records:
        assert r["hjepa"] == hjepa.__version__ and r["torch"] == torch.__version__
        assert r["device"] == "cpu" and r["host"] and r["world_size"] == 1
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", r["start_time"])
        assert r["command"] == command_line() and r["python_executable"] == sys.executable
    assert records[0]["git"] == git_commit()
    assert (tmp_path / "run" / "config.yaml").read_text() == config_text


def test_git_commit_only_for_a_tracked_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    git("init", "-q")
    (repo / "mod.py").write_text("x = 1\n")
    git("add", "mod.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert git_commit(repo / "mod.py") == {"commit": head, "dirty": False}
    (repo / "mod.py").write_text("x = 2\n")
    assert git_commit(repo / "mod.py") == {"commit": head, "dirty": True}
    (repo / "untracked.py").write_text("")
    assert git_commit(repo / "untracked.py") is None  # e.g. a venv inside another project
    outside = tmp_path / "plain"
    outside.mkdir()
    (outside / "mod.py").write_text("")
    assert git_commit(outside / "mod.py") is None


def _pieces_with(text: str, needle: str) -> list[str]:
    """The terminal segments (between carriage returns and newlines) that contain ``needle``."""
    return [p for line in text.split("\n") for p in line.split("\r") if needle in p]


def test_warnings_print_above_the_progress_bar(capsys):
    bar = console.progress_bar(True, 0, 10)
    bar.update(1)
    with console.warnings_above():
        warnings.warn("careful: something odd", UserWarning, stacklevel=1)
    console.say("a plain line")
    bar.update(1)
    bar.close()
    captured = capsys.readouterr()
    assert "%|" in captured.err  # the bar was drawn
    pieces = _pieces_with(captured.err, "careful: something odd")
    assert pieces and all("%|" not in p for p in pieces), pieces  # not inside the bar
    assert _pieces_with(captured.out, "a plain line") == ["a plain line"]


def test_the_terminal_shows_the_online_knn(tiny_config, tmp_path, capsys):
    train(tiny_config("train.max_steps=4", "train.knn_every=2", "run.progress=true"))
    captured = capsys.readouterr()
    probes = [r for r in read_metrics(tmp_path / "run", "probe")]
    assert [r["step"] for r in probes] == [2, 4]
    for record in probes:
        shown = console.probe_line(record["step"], record)
        assert f"level0 {record['knn_level0']:.4f}" in shown
        pieces = _pieces_with(captured.out, shown)
        assert pieces == [shown], (shown, captured.out)  # a line of its own, above the bar
    assert "%|" in captured.err


def test_command_line_as_typed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/site-packages/hjepa/__main__.py", "train", "a.b=1"])
    assert command_line() == ["python", "-m", "hjepa", "train", "a.b=1"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/hjepa", "train", "--config", "fmnist"])
    assert command_line() == ["hjepa", "train", "--config", "fmnist"]
