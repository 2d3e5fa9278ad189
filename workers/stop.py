"""The stop flag: SIGTERM/SIGINT only set it (no collective, no I/O in a handler). Torch-free, so a worker
installs it first thing, before the slow imports."""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """Set by SIGTERM/SIGINT. Ranks agree on it at step boundaries (see Trainer._agree_on_stop)."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
