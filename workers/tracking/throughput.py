"""Throughput beyond samples/s: ``tokens_per_s`` when the task declares ``tokens_per_sample``, and ``mfu`` (model
FLOPs utilisation: the FLOPs the step needs, per second, over the devices' peak) when it declares
``flops_per_sample`` and the device's peak is known — a GPU in the table below; never on a CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense peak FLOP/s by GPU name, for 16-bit math (bf16/fp16 tensor cores) and for fp32 runs (TF32 tensor cores).
_PEAKS = (("H200", 989.4e12, 494.7e12), ("H100", 989.4e12, 494.7e12), ("A100", 312e12, 156e12))


def peak_flops(device: torch.device, precision: str) -> float | None:
    """One device's peak FLOP/s for ``train.precision``, or None when it is not known (a CPU, another GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, half, fp32 in _PEAKS:
        if model in name:
            return half if precision in ("bf16", "fp16") else fp32
    return None


@dataclass(frozen=True)
class Throughput:
    """What turns samples/s into tokens/s and MFU for one run (the same on every rank)."""

    tokens_per_sample: float | None = None
    flops_per_sample: float | None = None
    peak_flops: float | None = None  # one device's
    world_size: int = 1

    def values(self, samples_per_s: float) -> dict[str, float]:
        """The row's ``tokens_per_s`` and ``mfu`` (those that can be known)."""
        out = {}
        if self.tokens_per_sample:
            out["tokens_per_s"] = round(samples_per_s * self.tokens_per_sample, 1)
        if self.flops_per_sample and self.peak_flops:
            out["mfu"] = round(samples_per_s * self.flops_per_sample / (self.peak_flops * self.world_size), 4)
        return out
