"""benchmarks/fresh_clone_clock.py: the README's main command found and its trace split by phase."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_main_command_is_the_readmes_line_after_its_marker():
    cmd = load_benchmark("fresh_clone_clock").main_command(README.read_text())
    assert "hjepa train --config quickstart" in cmd and "hjepa eval runs/quickstart" in cmd
    assert cmd.index("pip install") < cmd.index("hjepa train") < cmd.index("hjepa eval")


def test_phases_split_at_the_first_train_and_eval_commands():
    trace = "\n".join(
        [
            "+ 100.0 python3 -m venv .venv",
            "++ 130.5 apt-get update -qq",
            "+ 160.0 .venv/bin/hjepa train --config quickstart",
            "some output line",
            "+ 460.0 .venv/bin/hjepa eval runs/quickstart",
        ]
    )
    times = load_benchmark("fresh_clone_clock").phases(trace, end=760.25)
    assert times == {"install_s": 60.0, "train_s": 300.0, "eval_s": 300.2}
    with pytest.raises(ValueError, match="no time stamps"):
        load_benchmark("fresh_clone_clock").phases("no stamps here", end=1.0)


def test_a_traced_command_carries_stamps_that_split_it(tmp_path):
    """The wrapper must stamp commands even as root, where bash ignores an inherited PS4."""
    clock = load_benchmark("fresh_clone_clock")
    cmd = "true && sleep 0.2 && echo hjepa train > /dev/null && echo hjepa eval > /dev/null"
    proc = subprocess.run(["bash", "-c", clock.traced(cmd)], capture_output=True, text=True)
    times = clock.phases(proc.stderr, end=time.time())
    assert times["install_s"] >= 0.2 and times["train_s"] >= 0 and times["eval_s"] >= 0
