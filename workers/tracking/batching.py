"""Rank 0's completed log rows, written in batches: a row written alone between two short training steps runs on
cold caches — measured in the workers at hidden 64 (2.7 ms steps, a row every 27 ms): 0.29 ms a row alone against
0.10 ms in a batch of ten — so rows wait until :attr:`RowBatches.EVERY_S` has passed since the last write. A
background thread writes rows that have waited :attr:`RowBatches.stale_s` (twice as long: the loop is not coming
back — a hang, a long eval, a slow data loader — rather than merely between two writes of its own, so the thread
seldom takes a write, and the lock, from a loop that runs): a stalled run's metrics file is never more than about
``stale_s`` behind its last row. A write that fails on that thread is raised on the training thread at its next
:meth:`~RowBatches.add` or :meth:`~RowBatches.drain`: rows are never lost without a word."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("workers.tracking")
Item = TypeVar("Item")


class RowBatches(Generic[Item]):
    """Items (completed rows) :meth:`add`-ed by the training thread, handed to ``write`` in order, in batches.

    ``write(items)`` runs under this object's lock, on the training thread (in :meth:`add` once ``EVERY_S`` has
    passed since the last write, and in :meth:`drain`) or on the background thread (items that have waited
    ``stale_s``); :meth:`drain` returns once every item added before it has been written — so anything written
    after it (an eval row, a checkpoint) comes after those rows. A failed background write (its items are gone)
    stops the background thread and is raised by the next :meth:`add` or :meth:`drain`, once. :meth:`close` ends
    the thread, writing nothing.
    """

    EVERY_S = 0.5

    def __init__(self, write: Callable[[list[Item]], None]) -> None:
        self.write = write
        self.items: list[Item] = []
        self.lock = threading.Lock()
        self.written_at = time.perf_counter() - self.EVERY_S  # the first row is written at once
        self.failed: Exception | None = None  # the background thread's failed write, for the training thread
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._write_stale, name="orch-rows", daemon=True)
        self.thread.start()

    @property
    def stale_s(self) -> float:
        """How long rows wait before the background thread writes them: twice ``EVERY_S``."""
        return 2 * self.EVERY_S

    def add(self, item: Item) -> None:
        """Queue ``item``; write the batch when ``EVERY_S`` has passed since the last write. Raises a failed
        background write (see the class)."""
        self._raise_failed()
        with self.lock:
            self.items.append(item)
        if time.perf_counter() - self.written_at >= self.EVERY_S:
            self.drain()

    def drain(self) -> None:
        """Write every item added so far (an exception from ``write`` reaches the caller; those items are gone).
        Raises a failed background write first (see the class)."""
        self._raise_failed()
        self._write_waiting()

    def close(self) -> None:
        self.closing.set()
        self.thread.join(timeout=5)

    def _write_waiting(self) -> None:
        with self.lock:
            items, self.items = self.items, []
            if items:
                try:
                    self.write(items)
                finally:
                    self.written_at = time.perf_counter()

    def _raise_failed(self) -> None:
        with self.lock:
            failed, self.failed = self.failed, None
        if failed is not None:
            raise failed

    def _write_stale(self) -> None:
        while not self.closing.wait(self.EVERY_S / 2):
            if self.items and time.perf_counter() - self.written_at >= self.stale_s:
                try:
                    self._write_waiting()
                except Exception as exc:  # kept for the training thread, which raises it at its next add or drain
                    log.warning("rows could not be written in the background: %s (raised by the next write)", exc)
                    with self.lock:
                        self.failed = exc
                    return
