"""Fast in-process checks of the pieces: config tree, global sample order, prefix stripping, LR schedule."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from workers.checkpoint import strip_wrapper_prefixes
from workers.config import Config, ConfigError, config_from_dict, dump_config, load_config, plan_batches
from workers.data import GlobalOrder, StepBatchSampler
from workers.optim import lr_factor


def test_config_loads_overrides_and_round_trips(tmp_path):
    cfg = load_config(
        ROOT / "configs/quickstart.yaml",
        ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "task.args.hidden=8", "train.init_from=null"],
    )
    assert cfg.train.max_steps == 7 and cfg.optim.betas == (0.8, 0.9) and cfg.task.args["hidden"] == 8
    assert isinstance(cfg.optim.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3  # type: ignore[misc]
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trian.max_steps=3", "did you mean 'train.max_steps'"),
        ("data.global_bach_size=3", "did you mean 'data.global_batch_size'"),
        ("train.seed=true", "expected int, got bool"),
        ("optim.betas=[1]", "expected a list of 2 items"),
        ("train.max_steps=0", "must be >= 1"),
        ("train.max_steps", "is not key=value"),
        ("task.factory=nocolon", "expected 'package.module:function'"),
        ("train.max_steps.x=1", "expected int, got dict"),
    ],
)
def test_config_errors_name_the_key_and_hint(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config_from_dict({}, [override])


def test_batch_plan_is_derived_and_checked():
    cfg = config_from_dict({"data": {"global_batch_size": 48}, "train": {"grad_accum_steps": 2}})
    plan = plan_batches(cfg, 3)
    assert (plan.per_rank_batch, plan.micro_batch, plan.accum_steps) == (16, 8, 2)
    micro = config_from_dict({"data": {"global_batch_size": 48, "micro_batch_size": 4}})
    assert plan_batches(micro, 1).accum_steps == 12 and plan_batches(micro, 4).accum_steps == 3
    with pytest.raises(ConfigError, match="not divisible by world size 5"):
        plan_batches(cfg, 5)


def test_config_errors_need_no_torch():
    """Config errors answer before torch is imported (fast failure for a typo)."""
    code = (
        "import sys; from workers.config import load_config, ConfigError\n"
        "try: load_config('configs/quickstart.yaml', ['train.nope=1'])\n"
        "except ConfigError: pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_global_order_is_the_same_for_every_world_size_and_cursor():
    n, gbs, steps = 50, 12, 10  # crosses epoch boundaries mid-batch
    order = GlobalOrder(n, seed=3)
    stream = [order.take(s * gbs, gbs) for s in range(steps)]
    for epoch in range(3):  # each epoch is a permutation, and epochs differ
        perm = order.permutation(epoch).tolist()
        assert sorted(perm) == list(range(n))
    assert order.permutation(0).tolist() != order.permutation(1).tolist()
    for ws in (1, 2, 3, 4):
        cfg = config_from_dict({"data": {"global_batch_size": gbs}})
        plan = plan_batches(cfg, ws)
        for start in (0, 4):  # from scratch and resumed at step 4
            per_rank = [iter(StepBatchSampler(n, 3, plan, r, start)) for r in range(ws)]
            for s in range(start, steps):
                items = [item for it in per_rank for item in next(it)]
                assert [i for _, i in items] == stream[s], (ws, start, s)
                assert [p for p, _ in items] == list(range(s * gbs, (s + 1) * gbs))  # stream positions


def test_strip_wrapper_prefixes_only_when_every_key_has_them():
    t = torch.zeros(1)
    assert strip_wrapper_prefixes({"_orig_mod.module.a": t, "_orig_mod.module.b": t}).keys() == {"a", "b"}
    mixed = {"module.a": t, "b": t}  # a real submodule named "module": keep it
    assert strip_wrapper_prefixes(mixed).keys() == mixed.keys()


def test_lr_schedule_warms_up_then_decays_by_global_step():
    cfg = Config().optim.__class__(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(cfg, 20, s) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert factors[20] == pytest.approx(0.1)


def test_unwrap_peels_compile_and_dataparallel_in_any_nesting():
    from torch import nn

    from workers.checkpoint import unwrap

    model = nn.Linear(2, 2)
    assert unwrap(torch.compile(nn.DataParallel(model))) is model
    assert unwrap(nn.DataParallel(torch.compile(model))) is model


class _RandomSamples:
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)  # augmentation drawn from the global RNG, as user code does


class _Draws:
    """A dataset drawing from Python's and/or NumPy's global generators, on some samples only (``every``)."""

    def __init__(self, python: bool, numpy: bool, every: int = 1, start: int = 0) -> None:
        self.python, self.numpy, self.every, self.start = python, numpy, every, start

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> tuple[float, ...]:
        import random

        import numpy as np

        out = [float(index)]
        if index >= self.start and index % self.every == 0:
            # one Gaussian each: a cached one (from the training code's draw) is handed out without moving the
            # generator, the hole a watch of the position alone would fall into
            if self.python:
                out.append(random.gauss(0, 1))
            if self.numpy:
                out.append(float(np.random.randn()))
        return tuple(out)


@pytest.mark.parametrize(
    "kind",
    ["nothing", "python", "numpy", "both", "python every 3rd", "numpy from sample 25", "both every 7th from 10"],
)
def test_per_sample_seeding_leaves_unused_generators_alone_and_equals_seeding_all(kind):
    """Whatever a dataset draws, and whatever the training code draws between samples (leaving Gaussian values
    cached in Python's and NumPy's generators), every sample equals the one made with all generators seeded."""
    import random

    import numpy as np

    from workers.data import IndexedDataset
    from workers.data.seeding import SampleSeeder, sample_seed, seed_all

    every = int(kind.split("every ")[1].split("th")[0].split("rd")[0]) if "every" in kind else 1
    start = int(kind.split("from ")[1].split()[-1]) if "from" in kind else 0
    spec = {"python": "python" in kind or "both" in kind, "numpy": "numpy" in kind or "both" in kind}
    data = _Draws(**spec, every=every, start=start)
    wrapped = IndexedDataset(data, seed=7)
    positions = [(p, (p * 7) % len(data)) for p in range(60)]
    expected = []
    for position, index in positions:  # the reference: every generator seeded before every sample
        seed_all(sample_seed(7, position))
        expected.append(data[index])
    for i, (position, index) in enumerate(positions):
        if i % 4 != 3:  # the training code draws between samples, leaving a cached Gaussian in both
            random.gauss(0, 1), np.random.randn()
        state = (random.getstate(), np.random.get_state())
        got = wrapped[(position, index)][1]
        assert got == expected[i], f"{kind}: sample at position {position} differs from the fully seeded one"
        if kind == "nothing" and i % 4 == 3:
            # nothing drawn: nothing reseeded (except NumPy at the first sample, and both after the training code
            # left Gaussians cached: a cached value is handed out without moving the generator, so it is seeded)
            assert random.getstate() == state[0]
            assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state[1], strict=True))
    assert SampleSeeder()._python is not None and SampleSeeder()._numpy is not None  # the fast path ran here
    assert (wrapped._seeder.python_drawn, wrapped._seeder.numpy_drawn) == (spec["python"], spec["numpy"])


def test_samples_are_seeded_by_stream_position_unless_the_task_opts_out():
    from workers.data import IndexedDataset
    from workers.slurm_job import parse_time_left

    seeded = IndexedDataset(_RandomSamples(), seed=7)
    a, b = seeded[(42, 3)][1], seeded[(42, 3)][1]
    assert torch.equal(a, b) and not torch.equal(a, seeded[(43, 3)][1])  # a function of the stream position
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    plain = IndexedDataset(_RandomSamples(), seed=7, seed_samples=False)
    assert torch.equal(plain[(42, 3)][1], expected)  # opted out: the RNG is left alone
    # squeue's time-left format (used to tell a time limit from a preemption)
    assert [parse_time_left(t) for t in ("0:45", "1:02:03", "2-00:00:10", "UNLIMITED")] == [45, 3723, 172810, None]


def test_batched_fetching_makes_the_batches_sample_by_sample_fetching_makes():
    """A TensorDataset (never seeded: pure indexing) is gathered a micro-batch at a time, a dataset with its own
    ``__getitems__`` is asked once a micro-batch; the batches are those of one ``__getitem__`` per sample."""
    from torch.utils.data import Subset, TensorDataset

    from workers.config.plan import BatchPlan
    from workers.data import Collated, IndexedDataset, StepBatchSampler, make_loader

    x, y = torch.randn(50, 3), torch.arange(50)

    class PerSample:  # the same samples, one __getitem__ at a time
        def __len__(self) -> int:
            return 50

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return x[i], y[i]

    def batches(dataset, collate=None, seed_samples=True) -> list:
        plan = BatchPlan(world_size=2, global_batch_size=12, per_rank_batch=6, micro_batch=3, accum_steps=2)
        loader = make_loader(dataset, StepBatchSampler(50, 3, plan, rank=1, start_step=2), 0, collate, False,
                             seed_samples)  # fmt: skip
        return [b for b, _ in zip(loader, range(40), strict=False)]  # past an epoch boundary

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return type(a) is type(b) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b, strict=True))

    reference = batches(PerSample(), seed_samples=False)
    assert len(reference) == 40 and type(reference[0][1]) is list  # (indices, [x, y]) from default_collate
    assert same(batches(TensorDataset(x, y)), reference)  # declares nothing, yet nothing is seeded
    gathered = IndexedDataset(TensorDataset(x, y), seed=3, collated=True)
    assert not gathered.seed_samples and isinstance(gathered.__getitems__([(0, 4), (1, 9)]), Collated)
    assert same(batches(Subset(TensorDataset(x, y), range(50)), seed_samples=False), reference)
    collate = lambda samples: torch.stack([s[0] for s in samples])  # noqa: E731 - a task's own collate_fn
    assert same(batches(TensorDataset(x, y), collate), batches(PerSample(), collate, seed_samples=False))

    # a collate that draws (mixup-like) finds the generators seeded by stream position, whatever came before
    import random

    import numpy as np

    def drawing(samples):
        return torch.stack([s[0] for s in samples]) * random.random() + float(np.random.rand())

    runs = []
    for state in (1, 2):
        random.seed(state)
        np.random.seed(state)
        runs.append(batches(TensorDataset(x, y), drawing))
    assert same(runs[0], runs[1])


def test_a_rendezvous_port_taken_meanwhile_is_recognised_from_torchs_own_error():
    """free_port can only pick a port that is free *now*; if another process binds it before rank 0 does, torch's
    store fails with EADDRINUSE — the supervisor then starts the group again on another port (not a restart)."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    from orchestrator.outcome import RankOutcome, RunResult
    from workers.contract import ErrorRecord

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(Exception) as exc:
            dist.TCPStore("127.0.0.1", taken.getsockname()[1], 1, True, timeout=timedelta(seconds=5))
    record = ErrorRecord.from_exception(0, exc.value)
    assert RunResult(root_cause=RankOutcome(0, 1, None, record)).port_taken
    other = ErrorRecord.from_exception(0, RuntimeError("injected failure on call 5"))
    assert not RunResult(root_cause=RankOutcome(0, 1, None, other)).port_taken
    assert not RunResult().port_taken


def test_fsdp_bf16_hands_the_loss_fp32_outputs(tmp_path):
    """Under train.parallel=fsdp with bf16, the units compute in bf16 but the root's output reaches the task's loss in
    fp32, as under autocast: CUDA refuses the backward of a loss mixing a bf16 output with an fp32 target (seen on an
    H200 with the quickstart task's mse_loss). An in-process gloo group of one rank; the mesh and FSDP2 are real."""
    import torch.distributed as dist

    from workers.config import TrainConfig
    from workers.dist import DistContext
    from workers.parallel import shard
    from workers.tasks import resolve
    from workers.tasks.quickstart import build

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        task = resolve(build(n=64, hidden=16))
        ctx = DistContext(0, 0, 1, 1, "127.0.0.1", 0, torch.device("cpu"), "gloo", "single")
        model = shard(task.model, task, ctx, TrainConfig(precision="bf16", parallel="fsdp"))
        seen: list[torch.dtype] = []
        for unit in model.children():
            unit.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
        x, _ = next(iter(torch.utils.data.DataLoader(task.dataset, batch_size=8)))
        out = model(x)
        assert out.dtype == torch.float32
        assert torch.bfloat16 in seen  # the units still compute in bf16
    finally:
        dist.destroy_process_group()
