"""The quickstart task on a "broken device": every worker on slot ``broken_slot`` (``ORCH_SLOT``) raises once it
has trained ``fail_after`` micro-steps — in every attempt, as a failing GPU would. For benchmarks/elastic_bench.py."""

from __future__ import annotations

import os

from workers.tasks import quickstart


class BrokenSlotTask:
    def __init__(self, broken_slot: int, fail_after: int, **kwargs) -> None:
        inner = quickstart.build(**kwargs)
        self.model, self.dataset, self.inner = inner.model, inner.dataset, inner
        self.broken = os.environ.get("ORCH_SLOT") == str(broken_slot)
        self.fail_after, self.calls = fail_after, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.broken and self.calls > self.fail_after:
            raise RuntimeError(f"device slot {os.environ['ORCH_SLOT']} failed")
        return self.inner.loss(model, batch)


def build(broken_slot: int = 2, fail_after: int = 30, **kwargs) -> BrokenSlotTask:
    return BrokenSlotTask(broken_slot, fail_after, **kwargs)
