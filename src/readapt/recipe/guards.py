"""What keeps a run safe: a stop request (SIGINT / SIGTERM) honoured at a step boundary, one clear error when the
disk fills, and the debug delay that lets the kill/resume tests stop a tiny run mid-way."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from readapt.errors import TrainingError
from readapt.recipe.checkpoint import is_disk_full, list_checkpoints
from readapt.recipe.run_directory import RunDirectory

logger = logging.getLogger("readapt")


class StopRequest:
    """The first SIGINT or SIGTERM asks the loop to stop at the next step boundary (it writes a checkpoint
    first); a second SIGINT interrupts at once."""

    def __init__(self):
        self.signal: str | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handle(number, frame):
            if self.signal is not None and number == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signal.Signals(number).name
            logger.warning("%s received: stopping after this step with a checkpoint (SIGINT again: stop now)",
                           self.signal)

        for number in previous:
            signal.signal(number, handle)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


@contextlib.contextmanager
def disk_guard(what: str, step: int | None, run: RunDirectory):
    """An OSError while writing `what` (disk full, quota, I/O error) becomes one clear TrainingError naming the
    newest checkpoint, which the atomic writes left intact."""
    try:
        yield
    except OSError as exc:
        newest = list_checkpoints(run.checkpoints)
        kept = (f"the last good checkpoint (step {newest[-1][0]}) is intact in {run.checkpoints}; free space and "
                "re-run the same command to resume") if newest else "no checkpoint had been written yet"
        why = "the disk is full" if is_disk_full(exc) else (exc.strerror or str(exc))
        at = f" at step {step}" if step is not None else ""
        raise TrainingError(f"could not write {what}{at}: {why}; {kept}") from None


def debug_step_delay() -> float:
    """READADAPT_DEBUG_STEP_DELAY seconds of sleep after each step: lets the kill/resume test stop a real run
    at an arbitrary point of a tiny model's training (which otherwise ends in a blink)."""
    try:
        return max(0.0, float(os.environ.get("READAPT_DEBUG_STEP_DELAY", "0")))
    except ValueError:
        return 0.0
