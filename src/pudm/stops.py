"""How a run stops before its last step: on a signal, or on losses that stay non-finite."""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint of the last complete step was saved."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(
            f"interrupted at step {step}; checkpoint saved: continue with pudm train --resume --out {run_dir}"
        )
        self.step = step


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class NonFiniteLoss(RuntimeError):
    """The loss stayed non-finite for too many steps in a row; the last good state was saved."""

    def __init__(self, step: int, count: int, run_dir: Path):
        super().__init__(
            f"stopped at step {step}: the loss was not finite for {count} steps in a row (those updates "
            f"were skipped; the last good weights are in the step {step} checkpoint): lower --lr, or use "
            f"--mixed-precision no, and start again with --overwrite --out {run_dir}"
        )
        self.step = step
