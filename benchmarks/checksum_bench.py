"""The checkpoint write path without the disk: ``torch.save`` of ~1 GB of tensors streamed to ``/dev/null``
through our checksumming writer (workers.fsutil.HashingWriter), against the same stream with the previous
checksum (sha256, computed in the writing thread) and against ``torch.save`` alone.

This isolates what the checksum costs a synchronous save from the disk, whose speed on this machine varies
several-fold between hours (raw write + fsync of 1 GB measured 2033 MB/s one day and 400-450 MB/s another).
The variants alternate; median (min-max) MB/s of serialised bytes.

    python benchmarks/checksum_bench.py [--repeats 5] [--out benchmarks/results/checksum.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loop_bench import summarize  # noqa: E402
from workers.fsutil import NEW_DIGEST, HashingWriter  # noqa: E402


class _Sha256Serial(HashingWriter):
    """The writer as it was: sha256 of every chunk in the writing thread, then the write."""

    _PARALLEL_BYTES = 1 << 62

    def __init__(self, f) -> None:
        super().__init__(f)
        self.digest = hashlib.sha256()


class _Counting:
    """A plain pass-through that only counts (``torch.save`` alone, with no checksum)."""

    def __init__(self, f) -> None:
        self.f, self.size = f, 0

    def write(self, data: bytes) -> int:
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _rate(state: dict, writer_cls: type) -> float:
    import torch  # noqa: PLC0415

    with open(os.devnull, "wb") as f:
        out = writer_cls(f)
        t0 = time.perf_counter()
        torch.save(state, out)
        seconds = time.perf_counter() - t0
    return out.size / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "checksum.json")
    args = parser.parse_args()
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(1024, 1024) for i in range(240)}  # 1.007 GB of fp32
    variants = {"torch.save alone": _Counting, "sha256 in the writing thread (before)": _Sha256Serial,
                f"{NEW_DIGEST} beside the write (now)": HashingWriter}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, cls in variants.items():
            rates[name].append(_rate(state, cls))
    result = {
        "benchmark": "checksum",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "state_mb": round(sum(t.numel() * 4 for t in state.values()) / 1e6, 1),
        "repeats": args.repeats,
        "mb_per_s": {name: summarize(v, 0) for name, v in rates.items()},
    }
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
