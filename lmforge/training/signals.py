"""Ctrl-C (SIGINT) and SIGTERM while training: stop at a step boundary with a checkpoint, not mid-write.

The first signal asks the loop to finish the current step, save a checkpoint of it (atomically, as
every checkpoint), write the loss plot and stop; a second one quits at once (as Ctrl-C always did;
the checkpoints already written stay intact). The handlers are installed only while a training loop
runs on the main thread, and the previous ones are put back afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType


class GracefulStop:
    """A context manager; ``requested`` names the signal once one arrived (None before)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *_exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested is not None:  # the second one: quit now
            self._restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if os.environ.get("RANK", "0") != "0":  # under torchrun every process gets it: rank 0 says so
            return
        print(f"\n{self.requested}: finishing this step, then saving a checkpoint (once more to quit at once)",
              file=sys.stderr, flush=True)
