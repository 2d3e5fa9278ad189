"""Task factories used by the tests (importable by workers: the tests put this folder on PYTHONPATH).

They wrap the built-in tasks and add what a test needs to observe or provoke: slow steps (so a run can be
killed between checkpoints), an injected failure on one rank, an audit of which rank writes checkpoint files.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

from workers.tasks import charlm, quickstart


class _Slowed:
    def __init__(
        self, inner, step_sleep_s: float, fail_rank: int | None, fail_call: int | None, hold_at_call: int | None = None
    ) -> None:
        self.inner, self.model, self.dataset = inner, inner.model, inner.dataset
        self.eval_dataset = getattr(inner, "eval_dataset", None)
        self.tokens_per_sample = getattr(inner, "tokens_per_sample", None)
        self.flops_per_sample = getattr(inner, "flops_per_sample", None)
        self.step_sleep_s, self.fail_rank, self.fail_call, self.calls = step_sleep_s, fail_rank, fail_call, 0
        self.hold_at_call = hold_at_call
        self.slow_rank: int | None = None  # step_sleep_s on this rank only (None: every rank)
        self.fail_slot: int | None = None  # every worker on this device slot fails from call fail_call (or 1) on
        self.fail_node: str | None = None  # every worker on this SLURM node fails from call fail_call (or 1) on

    def loss(self, model, batch):
        self.calls += 1
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))  # srun sets no RANK
        if self.fail_rank == rank and self.calls == self.fail_call:
            raise RuntimeError(f"injected failure on call {self.calls}")
        node = os.environ.get("SLURMD_NODENAME")
        if self.fail_node is not None and node == self.fail_node and self.calls >= (self.fail_call or 1):
            raise RuntimeError(f"node {node} is broken (call {self.calls})")  # whatever rank runs there
        slot = os.environ.get("ORCH_SLOT")
        if self.fail_slot is not None and slot == str(self.fail_slot) and self.calls >= (self.fail_call or 1):
            raise RuntimeError(f"device slot {slot} is broken (call {self.calls})")  # whatever rank runs there
        while self.hold_at_call is not None and self.calls >= self.hold_at_call:
            time.sleep(0.05)  # the run stays where it is until the test has seen what it waits for, then kills it
        if self.step_sleep_s and self.slow_rank in (None, rank):
            time.sleep(self.step_sleep_s)
        loss = self.inner.loss(model, batch)
        return loss * float("nan") if getattr(self, "nan_loss", False) else loss


def _install_write_audit(audit_dir: str) -> None:
    """Record every Python-level open-for-write / rename under a checkpoints/ folder, per rank."""
    rank = os.environ.get("RANK", "0")
    out = Path(audit_dir) / f"rank-{rank}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    busy = [False]

    def hook(event: str, args: tuple) -> None:
        if busy[0]:
            return
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2]
            if isinstance(mode, str):
                writes = any(c in mode for c in "wax+")
            else:
                writes = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            path = str(args[0])
        elif event in ("os.rename", "os.replace", "os.remove", "shutil.rmtree", "os.mkdir"):
            writes, path = True, str(args[0])
        else:
            return
        if writes and "checkpoints" in path:
            busy[0] = True
            try:
                with open(out, "a") as f:
                    f.write(f"{event} {path}\n")
            finally:
                busy[0] = False

    sys.addaudithook(hook)


def _install_die_in_save(marker: str, step: int, rank: int) -> None:
    """SIGKILL rank ``rank`` in the middle of writing checkpoint ``step``, once. Rank 0 of a DDP run (the writer):
    after model.pt is written, while optim.pt is being opened. Another rank (a sharded run, where every rank writes
    its shard under dcp/): right after DCP wrote the first item of its shard file, before the rest (a wrapper of
    DCP's per-item writer, so the kill lands mid-file however busy the machine is). ``marker`` records that it
    happened (for a shard: the file's size at the kill)."""
    if int(os.environ.get("RANK", "0")) != rank:
        return
    target = f".tmp-step-{step:08d}-"
    if rank != 0:
        _kill_after_first_shard_item(marker, target, f"__{rank}_0.distcp")
        return

    def hook(event: str, args: tuple) -> None:
        path = str(args[0]) if event == "open" else ""
        writing = target in path and path.endswith("optim.pt") and "w" in str(args[1])
        if writing and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def _kill_after_first_shard_item(marker: str, target: str, name: str) -> None:
    from torch.distributed.checkpoint import filesystem

    write_item = filesystem._write_item

    def write_then_die(transforms, stream, *args, **kwargs):
        result = write_item(transforms, stream, *args, **kwargs)
        path = str(getattr(stream, "name", ""))
        if target in path and path.endswith(name) and not os.path.exists(marker):
            stream.flush()
            with open(marker, "w") as f:
                f.write(str(os.path.getsize(path)))
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    filesystem._write_item = write_then_die


class _Forbid:
    """An import hook that makes importing ``name`` (or its submodules) fail in this worker."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ImportError(f"{fullname} is forbidden in this test")


def quick(
    step_sleep_s: float = 0.0,
    fail_rank: int | None = None,
    fail_call: int | None = None,
    audit_dir: str | None = None,
    die_in_save: str | None = None,
    die_in_save_step: int = 8,
    die_in_save_rank: int = 0,
    augment: float = 0.0,
    forbid_import: str | None = None,
    hold_at_call: int | None = None,
    block_after_samples: int | None = None,
    block_marker: str | None = None,
    block_rank: int | None = None,
    slow_rank: int | None = None,
    per_sample_metrics: bool = False,
    slow_eval_after: int | None = None,
    slow_eval_s: float = 0.2,
    slow_eval_marker: str | None = None,
    own_optimizer: bool = False,
    optimizer_split: int = 1,
    own_scheduler: bool = False,
    extra_param: bool = False,
    poison_index: int | None = None,
    nan_loss: bool = False,
    bad_optimizer: str | None = None,
    batchnorm: bool = False,
    bad_shard_units: bool = False,
    fail_slot: int | None = None,
    fail_node: str | None = None,
    **kwargs,
):
    if audit_dir:
        _install_write_audit(audit_dir)
    if die_in_save:
        _install_die_in_save(die_in_save, die_in_save_step, die_in_save_rank)
    if forbid_import:
        sys.meta_path.insert(0, _Forbid(forbid_import))
    task = quickstart.build(**kwargs)
    if augment:
        task.dataset = _NoisyInputs(task.dataset, augment)
    if block_after_samples is not None:
        task.dataset = _BlockingSamples(task.dataset, block_after_samples, block_marker, block_rank)
    cls = _Evaluated if per_sample_metrics else _Slowed
    task = cls(task, step_sleep_s, fail_rank, fail_call, hold_at_call)
    task.slow_eval = (slow_eval_after, slow_eval_s, slow_eval_marker)
    task.slow_rank = slow_rank
    task.fail_slot = fail_slot
    task.fail_node = fail_node
    if batchnorm:  # a BatchNorm layer after the first projection (train.sync_batchnorm on a GPU)
        inner = task.model
        task.model = task.inner.model = torch.nn.Sequential(inner[0], torch.nn.BatchNorm1d(inner[0].out_features),
                                                             *inner[1:])  # fmt: skip
    if bad_shard_units:  # the model itself is no unit of itself
        task.shard_units = lambda model: [model]
    if extra_param:  # the model "gained" a parameter since its checkpoints were written
        task.model.register_parameter("extra", torch.nn.Parameter(torch.zeros(4)))
    if poison_index is not None:
        task.dataset = task.inner.dataset = _Poisoned(task.dataset, poison_index)
    task.nan_loss = nan_loss
    if own_optimizer:
        task.optimizer = lambda model: _two_groups(model, optimizer_split)
    if bad_optimizer == "junk":  # not an optimizer at all
        task.optimizer = lambda model: 42
    if bad_optimizer == "foreign":  # the seed's mistake: an optimizer over another copy of the model
        task.optimizer = lambda model: torch.optim.SGD(quickstart.make_model(16, 32, 4).parameters(), lr=0.1)
    if own_scheduler:
        task.scheduler = lambda optimizer, max_steps: torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.5)
    return task


def _two_groups(model, split: int):
    """A user's optimizer: TaggedAdamW over two groups, the first ``split`` parameter tensors at 4x the lr."""
    params = list(model.parameters())
    return TaggedAdamW([{"params": params[:split], "lr": 4e-3}, {"params": params[split:]}], lr=1e-3)


class TaggedAdamW(torch.optim.AdamW):
    """AdamW that also counts its updates of each parameter in its state: a test sees it is the optimizer used and
    the one saved."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["tagged_updates"] = self.state[p].get("tagged_updates", 0) + 1
        return loss


class _Wrapped:
    """A dataset wrapper: the same length, each subclass changes ``__getitem__``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)


class _Poisoned(_Wrapped):
    """Sample ``index`` has NaN inputs (one bad record in a user's data); every other sample is unchanged."""

    def __init__(self, dataset, index: int) -> None:
        super().__init__(dataset)
        self.index = index

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return (x * float("nan"), y) if index == self.index else (x, y)


class _Evaluated(_Slowed):
    """With the task's own ``evaluate``: per-sample squared and absolute errors.

    ``slow_eval``: after ``after`` calls of evaluate() (the probe is one), this process first creates
    ``<marker>-rank<r>`` (so a test knows an eval is under way) and then sleeps ``s`` seconds per eval batch — only
    in the process that created the marker: a relaunch evaluates at full speed."""

    eval_calls, slowing = 0, False

    def evaluate(self, model, batch):
        after, sleep_s, marker = getattr(self, "slow_eval", (None, 0.0, None))
        self.eval_calls += 1
        if after is not None and self.eval_calls > after:
            flag = Path(f"{marker}-rank{os.environ.get('RANK', '0')}")
            if not self.slowing and not flag.exists():
                self.slowing = True
                flag.touch()
            if self.slowing:
                time.sleep(sleep_s)
        x, y = batch
        err = model(x) - y
        return {"mse": (err**2).mean(dim=1), "mae": err.abs().mean(dim=1)}


class _NoisyInputs(_Wrapped):
    """Random augmentation inside __getitem__ (draws from torch's global RNG, as user code would)."""

    def __init__(self, dataset, scale: float) -> None:
        super().__init__(dataset)
        self.scale = scale

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return x + self.scale * torch.randn_like(x), y


class _BlockingSamples(_Wrapped):
    """After ``after`` samples in one process, ``__getitem__`` blocks (a loader worker stuck reading a file),
    first creating ``<marker>-rank<r>`` so a test knows it is blocked."""

    def __init__(self, dataset, after: int, marker: str | None, rank: int | None = None) -> None:
        super().__init__(dataset)
        self.after, self.marker, self.served, self.rank = after, marker, 0, rank

    def __getitem__(self, index):
        self.served += 1
        if self.served > self.after and self.rank in (None, int(os.environ.get("RANK", "0"))):
            if self.marker:
                Path(f"{self.marker}-rank{os.environ.get('RANK', '0')}").touch()
            time.sleep(600)
        return self.dataset[index]


def chars(step_sleep_s: float = 0.0, **kwargs):
    return _Slowed(charlm.build(**kwargs), step_sleep_s, None, None)


def not_a_task(**kwargs):
    """A factory that returns the wrong object (a model without dataset and loss)."""
    return quickstart.build(**kwargs).model


def named_metrics(metric_names: str = "mse,mae", rank1_metric_names: str | None = None, **kwargs):
    """``quick`` (its arguments in ``kwargs``) with an ``evaluate`` returning per-sample values under the names in
    ``metric_names`` ("a,b": the per-sample squared error, times 1, 2, ... in that order); rank 1 returns the names
    in ``rank1_metric_names`` instead when given (a task whose metric names depend on the rank)."""
    task = quick(**kwargs)
    rank = int(os.environ.get("RANK", "0"))
    chosen = rank1_metric_names if rank == 1 and rank1_metric_names is not None else metric_names
    names = chosen.split(",")

    def evaluate(model, batch):
        x, y = batch
        err = ((model(x) - y) ** 2).mean(dim=1)
        return {name: err * (i + 1) for i, name in enumerate(names)}

    task.evaluate = evaluate
    return task


def input_classes(eval_device: str | None = None, optimizer_kind: str | None = None, **kwargs):
    """``quick`` (its arguments in ``kwargs``) with one of the mistakes tests/test_input_classes.py makes as a user
    would. ``eval_device``: an ``evaluate`` whose per-sample values are moved to that device ("meta": the one other
    device a CPU-only machine has). ``optimizer_kind``: ``lbfgs`` (an optimizer whose step needs a closure),
    ``two_groups`` (one parameter in two param groups), ``twice_in_group`` (one parameter twice in one group)."""
    task = quick(**kwargs)
    if eval_device is not None:

        def evaluate(model, batch):
            x, y = batch
            return {"mse": ((model(x) - y) ** 2).mean(dim=1).to(eval_device)}

        task.evaluate = evaluate
    if optimizer_kind == "lbfgs":
        task.optimizer = lambda model: torch.optim.LBFGS(model.parameters(), lr=0.1)
    if optimizer_kind == "two_groups":
        task.optimizer = lambda model: torch.optim.AdamW(
            [{"params": list(model.parameters())}, {"params": [next(model.parameters())], "lr": 1e-4}], lr=1e-3
        )
    if optimizer_kind == "twice_in_group":
        task.optimizer = lambda model: torch.optim.SGD([*model.parameters(), next(model.parameters())], lr=0.1)
    return task


class _Generated:
    """``n`` samples that exist only as a function of their index (no storage): a dataset of any size."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        x = torch.randn(16, generator=torch.Generator().manual_seed(index))
        return x, x[:4] * 0.5


def huge(n: int = 10**12, ballast_mb: int = 0, **kwargs):
    """The quickstart model on ``n`` generated samples; ``ballast_mb``: every worker also holds that much memory
    (the control that shows a peak-RSS measurement sees the workers)."""
    task = quickstart.build(eval_n=0, **kwargs)
    task.dataset = _Generated(n)
    task.ballast = torch.ones(ballast_mb * 2**18) if ballast_mb else None
    return task


def gpt(step_sleep_s: float = 0.0, **kwargs):
    """The built-in GPT task, slowed per step (a test can kill it between two checkpoints)."""
    from workers.tasks import gpt as gpt_task

    return _Slowed(gpt_task.build(**kwargs), step_sleep_s, None, None)
