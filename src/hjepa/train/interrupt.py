"""Clean stops on SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption).

While a :class:`StopSignals` is active, the handlers of both signals only record the first one:
no exception can cut a step, a log line or a checkpoint write short. The training loop asks
at each optimizer-step boundary whether to stop (under DDP every rank takes the largest signal
number seen by any rank, so all ranks stop after the same step), writes a checkpoint and raises
:class:`TrainingInterrupted`; the command line prints one line and exits ``128 + signal``.

A second signal is ignored with a note on stderr: the stop is already on its way, and a
checkpoint being written is finished and renamed into place first. ``kill -9`` still ends the
process at once; checkpoints are written atomically, so the previous one stays intact.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after a complete step, its checkpoint written.

    A ``KeyboardInterrupt``, so ``except Exception`` blocks do not swallow a user's Ctrl-C.
    """

    def __init__(
        self,
        signum: int,
        step: int,
        total_steps: int,
        checkpoint: Path | None,
        is_main: bool = True,
    ):
        self.signum, self.step, self.total_steps = signum, step, total_steps
        self.checkpoint = checkpoint
        self.is_main = is_main  # rank 0 of a DDP job (or the only process): it reports
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def describe(self) -> str:
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint yet"
        return f"stopped by {self.signal_name} after step {self.step}/{self.total_steps}; {where}"


class StopSignals:
    """Context manager: SIGINT/SIGTERM set :attr:`signum` instead of raising.

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    context does nothing and signals keep their usual effect. The previous handlers are put
    back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # os.write, not print: a handler may run while the main thread is inside print.
        name = signal.Signals(signum).name
        os.write(2, f"{name} ignored: already stopping after this step (kill -9 aborts)\n".encode())

    def agreed(self, env=None, device=None) -> int | None:
        """The signal to stop for, the same on every rank (every rank must call this at the
        same step boundary under DDP); None to go on."""
        seen = self.signum or 0
        if env is not None and env.enabled:
            from hjepa.train.distributed import max_over_ranks

            seen = max_over_ranks(seen, env, device)
        return seen or None
