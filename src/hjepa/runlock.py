"""One writer per run directory: ``RUN_DIR/train.lock``, held by the process that trains it.

``hjepa train`` takes an exclusive ``flock`` on that file before it touches the run dir and
writes who holds it (pid, host, start time, command, torchrun job). A second ``hjepa train`` on
the same run dir is refused in one line naming that process. The kernel drops a ``flock`` when
its holder dies, however it dies, so a lock file that a killed run left behind is stale: the
next run takes it over and says whose it was. A clean end deletes the file. Under ``torchrun``
rank 0 alone holds the lock for the whole job (rank 0 alone writes the run dir; the others wait
for it at the start), so the ranks of one job never refuse each other.

On a file system without ``flock`` (some network mounts) the holder is judged by its pid on the
same host; a lock written on another host is refused, naming the file to delete once that job
is gone.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hjepa.checkpoint import CheckpointWriteError

LOCK = "train.lock"
# flock is not there: fall back to the pid on this host.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirBusy(OSError):
    """The run dir is being trained by another process; the message names it."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class RunLock:
    """A held lock; ``previous``: the record of a dead holder it took over, else None."""

    path: Path
    fd: int
    previous: dict[str, Any] | None

    def release(self) -> None:
        """Delete the file, then drop the lock (in that order: a waiting process that locks
        the old file afterwards sees it unlinked and tries again)."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)

    def took_over(self) -> str | None:
        """The line saying whose stale lock was taken over, or None."""
        if self.previous is None:
            return None
        return f"took over the lock of {describe(self.previous)}, which is no longer running"


def holder_record() -> dict[str, Any]:
    """What the lock file says about this process."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "job": os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID"),
    }


def describe(record: dict[str, Any]) -> str:
    """``pid N on HOST (since TIME, job J)``: who a lock record names (its command is in the
    file, too long for a one-line message)."""
    job = f", job {record['job']}" if record.get("job") else ""
    return f"pid {record.get('pid')} on {record.get('host')} (since {record.get('started')}{job})"


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace")
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _write(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder_record()) + "\n").encode())
    os.fsync(fd)


def _busy(run_dir: Path, holder: dict[str, Any] | None, hint: str = "") -> RunDirBusy:
    who = describe(holder) if holder else "another process (its lock file is being written)"
    return RunDirBusy(
        f"{run_dir} is being trained by {who}: wait for it to end or stop it, or train into "
        f"another run.dir{hint}"
    )


def acquire(run_dir: str | Path) -> RunLock:
    """Own ``run_dir`` (creating it); :class:`RunDirBusy` when a live process owns it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # each retry: a holder released the file between open and lock
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise _busy(run_dir, holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_FLOCK:
                    raise
                return _acquire_by_pid(run_dir, path)
            if _same_file(fd, path):
                previous = _read(fd)  # a clean end deletes the file: a record is a dead holder's
                _write(fd)
                return RunLock(path, fd, previous)
            os.close(fd)  # its holder released it while we waited: lock the new file
        raise _busy(run_dir, None)
    except RunDirBusy:
        raise
    except OSError as e:
        raise CheckpointWriteError(
            e.errno, f"cannot write the run directory {run_dir}: {e.strerror or e}"
        ) from e


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _acquire_by_pid(run_dir: Path, path: Path) -> RunLock:
    """The same ownership without ``flock``: the file's pid, alive or not, on this host."""
    previous = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            with path.open("rb") as f:
                holder = _read(f.fileno())
            here = holder is not None and holder.get("host") == socket.gethostname()
            if here and not _alive(int(holder.get("pid", -1))):
                path.unlink(missing_ok=True)  # a dead holder's: take it over
                previous = holder
                continue
            hint = "" if here else f" (once that job is gone, delete {path})"
            raise _busy(run_dir, holder, hint) from None
        _write(fd)
        return RunLock(path, fd, previous)
    raise _busy(run_dir, None)
