"""Clean stops: Ctrl-C (SIGINT) and preemption (SIGTERM, as SLURM and Kubernetes send it) end a run after the
current step with a checkpoint on disk; ``--resume`` then continues it exactly.

The signal handler only sets a flag. A single process acts on it after the step it interrupted; under torchrun the
ranks agree on it at the next logging step (in the all-reduce that also shares the divergence check), so no
collective runs on the other steps and every rank stops at the same step. A second signal aborts at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first stop signal; ``signum`` says which one arrived (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the handlers for SIGINT and SIGTERM for the duration of the block (main thread only)."""
    request = StopRequest()

    def handler(signum, frame):
        if request.requested:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: no signal handling, run normally
        yield request
        return
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class Interrupted(Exception):
    """Raised after a stop signal once the checkpoint is on disk; ``exit_code`` is 128 + the signal number
    (130 for SIGINT, 143 for SIGTERM), as a shell reports a process ended by that signal."""

    def __init__(self, checkpoint: Path, signum: int = signal.SIGINT) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; checkpoint written to {checkpoint}; continue with --resume")
        self.checkpoint, self.signum, self.exit_code = checkpoint, signum, 128 + int(signum)
