"""How the model is spread over the ranks: DDP (replicated), FSDP2 (sharded) or HSDP (FSDP2 on a 2-D mesh: sharded
within groups of ranks, replicated across them). One place for what differs.

With ``train.parallel: fsdp`` every unit of ``task.shard_units(model)`` (default: the model's direct children that
hold parameters) and then the root get ``fully_shard`` over an explicit 1-d device mesh of all ranks (hsdp: a 2-d
mesh, replicate x shard; :func:`device_mesh`) — on the CPU
``init_device_mesh("cpu", ...)``: a default mesh on a GPU machine with a gloo group goes wrong (pytorch 132471).
Parameters, gradients and optimizer state are then DTensors sharded on dim 0; everything here that looks at them
(norms, finiteness, state dicts) works on the local shards and reduces across ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from workers.config import TrainConfig
from workers.dist import DistContext
from workers.errors import ConfigError
from workers.tasks import Task

log = logging.getLogger("workers.parallel")


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 sharded this model (its parameters are DTensors)."""
    return any_sharded(model.parameters())


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a sharded parameter)."""
    return any(isinstance(t, DTensor) for t in tensors)


def shard_units(task: Task, model: nn.Module) -> list[nn.Module]:
    """The modules that get their own ``fully_shard`` (each one all-gathers and frees its parameters on its own):
    ``task.shard_units(model)`` when the task has it, else the direct children holding parameters."""
    hook = task.shard_units
    if hook is None:
        return [c for c in model.children() if any(True for _ in c.parameters())]
    returned = hook(model)
    if isinstance(returned, nn.Module) or not isinstance(returned, Iterable):
        raise ConfigError(
            f"task.shard_units(model) returned {type(returned).__name__}, not a list of submodules. "
            "HINT: return e.g. list(model.blocks) (the transformer layers)"
        )
    units = list(returned)
    owned = {id(m) for m in model.modules()}
    for unit in units:
        if not isinstance(unit, nn.Module) or id(unit) not in owned or unit is model:
            raise ConfigError(
                f"task.shard_units returned {type(unit).__name__}: each unit must be a submodule of the model (not the "
                "model itself). HINT: return e.g. model.blocks (the transformer layers)"
            )
    return units


def mixed_precision(precision: str) -> Any:
    """FSDP's policy for ``train.precision``: parameters in bf16/fp16 for compute, gradients reduced in fp32 —
    FSDP's own mixed precision instead of autocast. None for fp32."""
    if precision == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: PLC0415 - only fsdp runs need it

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_group_size(train: TrainConfig, ctx: DistContext) -> int:
    """The ranks of one shard group: all of them for fsdp; ``train.shard_size`` or the ranks of a node for hsdp.
    ConfigError when it does not divide the world size."""
    if train.parallel != "hsdp":
        return ctx.world_size
    size = train.shard_size or ctx.local_world_size
    if ctx.world_size % size:
        raise ConfigError(
            f"config key 'train.shard_size' = {size} ({'set' if train.shard_size else 'the ranks of one node'}) does "
            f"not divide the world size {ctx.world_size}. HINT: set train.shard_size to a divisor of it"
        )
    return size


def device_mesh(train: TrainConfig, ctx: DistContext) -> Any:
    """FSDP's mesh, built explicitly (a default one on a GPU machine with a gloo group goes wrong, pytorch 132471):
    1-D over every rank for fsdp; for hsdp 2-D, ``(replicate, shard)`` = (world / shard size, shard size), so the
    ranks of a shard group are consecutive (one node's, with the default size)."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    size = shard_group_size(train, ctx)
    if train.parallel != "hsdp":
        return init_device_mesh(ctx.device.type, (ctx.world_size,))
    return init_device_mesh(ctx.device.type, (ctx.world_size // size, size), mesh_dim_names=("replicate", "shard"))


def shard(model: nn.Module, task: Task, ctx: DistContext, train: TrainConfig) -> nn.Module:
    """Apply FSDP2 in place (units first, then the root) and return the model: over every rank (fsdp), or sharded
    within groups and replicated across them (hsdp: gradients are reduce-scattered in a group, then all-reduced
    between the groups). Must be called on all ranks, before the optimizer is built (it must hold the sharded
    parameters). Without a process group (one process, no launcher) there is nothing to shard over: the model
    stays whole; checkpoints are still of the sharded kind."""
    precision, reshard_after_forward = train.precision, train.reshard_after_forward
    units = shard_units(task, model)  # checked in one process too: the mistake shows before the cluster run
    objects = [k for k, v in model.state_dict().items() if not isinstance(v, torch.Tensor)]
    if objects:  # a sharded checkpoint holds tensors only (anything else DCP would pickle, and we refuse to load)
        raise ConfigError(
            f"the model's state_dict holds {objects[0]!r}, a {type(model.state_dict()[objects[0]]).__name__}, not a "
            f"tensor: train.parallel={train.parallel} checkpoints hold tensors only. HINT: use train.parallel=ddp for "
            "this model"
        )
    if not ctx.distributed:
        log.info("train.parallel=%s in a single process: nothing to shard over (checkpoints are still sharded)",
                 train.parallel)  # fmt: skip
        return model
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    mesh = device_mesh(train, ctx)
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    policy = mixed_precision(precision)
    if policy is not None:
        options["mp_policy"] = policy
    for unit in units:
        fully_shard(unit, **options)
    if policy is not None:
        # The root hands the task's loss fp32 outputs, as autocast does for a loss under ddp: a loss that mixes a
        # bf16 output with an fp32 target fails its backward on CUDA ("Found dtype Float but expected BFloat16").
        options["mp_policy"] = dataclasses.replace(policy, output_dtype=torch.float32)
    fully_shard(model, **options)
    size = shard_group_size(train, ctx)
    layout = (
        f"over {ctx.world_size} ranks"
        if train.parallel == "fsdp"
        else (f"over groups of {size} ranks, replicated {ctx.world_size // size}x")
    )
    log.info("%s: %d unit(s) + root sharded %s (%s)", train.parallel, len(units), layout,
             f"{precision} parameters, fp32 reductions" if policy else "fp32")  # fmt: skip
    return model


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Accumulation micro-steps without a collective: DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync``
    (no reduce-scatter until the last micro-step). ``sync=True`` is a no-op."""
    if sync:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        with nullcontext():
            yield


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a value every rank holds in full (a DTensor norm is Replicate: its local tensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (the tensor itself when it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def nonfinite_mask(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, 1.0 where this rank's part of it (its shard of a DTensor) holds NaN/inf, else 0.0: one float
    tensor on the tensors' device, no host sync. An empty part is finite."""
    return torch.stack([(~torch.isfinite(local(t))).any() for t in tensors]).float()


def nonfinite_anywhere(tensors: list[torch.Tensor], ctx: DistContext) -> list[bool]:
    """Per tensor, whether it holds NaN/inf on *any* rank (each rank looks at its part: its shards of a DTensor, its
    own copy of a plain tensor; one all-reduce): the same answer on every rank. Must be called on all ranks."""
    if not tensors:
        return []
    bad = nonfinite_mask(tensors).to(ctx.device)
    ctx.all_reduce_sum(bad)
    return [count > 0 for count in bad.tolist()]


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out as ``target``: sharded the same way when ``target`` is a DTensor of the same
    global shape (each rank keeps its slice; no communication), else unchanged."""
    if isinstance(target, DTensor) and not isinstance(value, DTensor) and tuple(value.shape) == tuple(target.shape):
        return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    return value


def full_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The whole, unwrapped model state on rank 0's CPU (None on the others): what ``model.pt`` holds. Collective
    (parameters are all-gathered) when sharded; must be called on all ranks."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if ctx.is_main else None


def staged(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A host copy of a flat state (DTensors keep their layout, their local shard copied to CPU memory): what an
    async sharded save writes while training changes the live tensors. The DTensor is built from its spec directly:
    ``DTensor.from_local`` would move the copy back to the mesh's device (a second GPU copy of the state)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in flat.items():
        if isinstance(t, DTensor):
            out[key] = DTensor(t.to_local().detach().to("cpu", copy=True), t._spec, requires_grad=False)
        else:
            out[key] = t.detach().to("cpu", copy=True)
    return out


def checkpoint_group(ctx: DistContext) -> Any:
    """A gloo process group of all ranks for checkpoint collectives (DCP planning, digests): a background save
    runs them beside training's own collectives, which must not share a group. Collective: all ranks call it once."""
    if not ctx.distributed:
        return None
    return dist.new_group(backend="gloo")


def all_gather_objects(obj: Any, group: Any) -> list[Any]:
    """Every rank's ``obj`` (in rank order) on every rank. Collective over ``group``; ``[obj]`` without one."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def parameters_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds of ``tensors`` (local shards of DTensors)."""
    return sum(local(t).numel() * t.element_size() for t in tensors)
