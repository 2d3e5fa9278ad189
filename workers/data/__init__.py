"""Data: the one global sample order and each rank's share of it (``order``), the loader that fetches and collates
those samples (``loader``), per-sample RNG seeding (``seeding``) and the audit trail of consumed indices
(``recorder``)."""

from workers.data.loader import Collated, IndexedCollate, IndexedDataset, make_loader, to_device
from workers.data.order import DEFAULT_ORDER, GlobalOrder, MicroBatch, StepBatchSampler, derive_seed

__all__ = [
    "DEFAULT_ORDER", "Collated", "GlobalOrder", "IndexedCollate", "IndexedDataset", "MicroBatch", "StepBatchSampler",
    "derive_seed", "make_loader", "to_device",
]  # fmt: skip
