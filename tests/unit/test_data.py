"""workers/data/: the one global sample stream (the same on any world size, continued exactly by a resume), the
loader over it, per-sample seeding by stream position, and the audit trail of consumed indices."""

from __future__ import annotations

import json
import random
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from workers.config import config_from_dict, plan_batches
from workers.data import GlobalOrder, IndexedDataset, StepBatchSampler, derive_seed, make_loader, to_device
from workers.data.recorder import IndexRecorder
from workers.data.seeding import SampleSeeder, sample_seed, seed_all
from workers.dist import DistContext

N, GBS, SEED = 20, 12, 5


def _plan(world: int, accum: int = 2):
    return plan_batches(
        config_from_dict({}, [f"data.global_batch_size={GBS}", f"train.grad_accum_steps={accum}"]), world
    )


def _stream(world: int, steps: int, start_step: int = 0, accum: int = 2) -> list[list[int]]:
    """Per step, the dataset indices all ranks consume, rank 0's first (what the step's global batch is)."""
    plan = _plan(world, accum)
    per_rank = []
    for rank in range(world):
        it = iter(StepBatchSampler(N, SEED, plan, rank, start_step))
        micro = [next(it) for _ in range(steps * plan.accum_steps)]
        per_rank.append(
            [[i for m in micro[s * plan.accum_steps : (s + 1) * plan.accum_steps] for _, i in m] for s in range(steps)]
        )
    return [[i for rank in range(world) for i in per_rank[rank][s]] for s in range(steps)]


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    order = GlobalOrder(N, SEED)
    first, second = order.permutation(0).tolist(), order.permutation(1).tolist()
    assert sorted(first) == sorted(second) == list(range(N)) and first != second
    assert GlobalOrder(N, SEED).permutation(1).tolist() == second  # nothing but (seed, epoch) decides it
    assert GlobalOrder(N, SEED + 1).permutation(0).tolist() != first
    assert order.take(N - 3, 6) == first[-3:] + second[:3]  # the stream crosses the epoch boundary seamlessly
    assert order.take(0, 2 * N + 1) == first + second + GlobalOrder(N, SEED).permutation(2).tolist()[:1]
    with pytest.raises(ValueError, match="empty"):
        GlobalOrder(0, SEED)


def test_the_largest_seed_the_config_accepts_makes_a_stream():
    seed = config_from_dict({}, [f"train.seed={2**63 - 1}"]).train.seed
    for scheme in ("feistel", "randperm"):
        assert sorted(GlobalOrder(N, seed, scheme).take(0, N)) == list(range(N))
    # below the wrap, the randperm scheme's epoch seed is what it always was: runs begun with it keep their order
    small = GlobalOrder(N, SEED, "randperm").permutation(3).tolist()
    assert small == torch.randperm(N, generator=torch.Generator().manual_seed(SEED * 1_000_003 + 3)).tolist()


@pytest.mark.parametrize("world", [2, 3, 6])
def test_every_world_size_consumes_the_same_global_stream(world):
    reference = _stream(1, steps=5)
    assert _stream(world, steps=5) == reference
    order = GlobalOrder(N, SEED)
    assert reference == [order.take(s * GBS, GBS) for s in range(5)]  # step s is positions [s*G, (s+1)*G)


@pytest.mark.parametrize(("world_before", "world_after"), [(1, 1), (2, 3), (3, 1)])
def test_a_resume_mid_run_continues_the_stream_on_any_world_size(world_before, world_after):
    full = _stream(world_before, steps=7)
    assert _stream(world_after, steps=4, start_step=3) == full[3:]


def test_a_rank_takes_its_contiguous_slice_of_each_step():
    plan = _plan(3)
    sampler = StepBatchSampler(N, SEED, plan, rank=2, start_step=4)
    assert sampler.positions_for_step(4) == (4 * GBS + 2 * 4, 4)
    first = next(iter(sampler))  # (stream position, dataset index) pairs, one micro-batch of 2
    assert [p for p, _ in first] == [4 * GBS + 8, 4 * GBS + 9]
    assert [i for _, i in first] == GlobalOrder(N, SEED).take(4 * GBS + 8, 2)


def test_derived_seeds_are_stable_63_bit_and_distinct():
    seeds = {
        derive_seed(1, "eval"),
        derive_seed(1, "train"),
        derive_seed(2, "eval"),
        derive_seed("1", "eval"),
        derive_seed(12, 3),
        derive_seed(1, 23),
    }
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, "eval") == 1652379704381471045  # pinned: eval samples are seeded by it across versions


def _loader_batches(
    dataset, world: int, rank: int, steps: int, start_step: int = 0, workers: int = 0, seed_samples: bool = True
) -> list:
    plan = _plan(world)
    loader = make_loader(dataset, StepBatchSampler(N, SEED, plan, rank, start_step), workers, None, False, seed_samples)
    return [b for b, _ in zip(loader, range(steps * plan.accum_steps), strict=False)]


def test_the_loader_yields_indices_with_the_batch_of_those_samples():
    x, y = torch.randn(N, 3), torch.arange(N) * 10
    batches = _loader_batches(TensorDataset(x, y), world=2, rank=1, steps=3)
    assert len(batches) == 6
    expected = [i for step in _stream(1, steps=3) for i in step[6:]]  # rank 1's half of each step
    assert torch.cat([ix for ix, _ in batches]).tolist() == expected
    for indices, (bx, by) in batches:
        assert torch.equal(bx, x[indices]) and torch.equal(by, indices * 10)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", ["tensors", "seeded", "collate_fn"])
def test_the_in_process_batches_are_the_dataloaders_batches(kind):
    """num_workers 0 skips torch's DataLoader machinery: the batches (and the RNG state they leave) are the ones a
    single-process DataLoader makes over the same sampler, past an epoch boundary and from a resumed step."""
    from torch.utils.data import DataLoader

    from workers.data import IndexedCollate

    dataset = {"tensors": TensorDataset(torch.randn(N, 3), torch.arange(N)), "seeded": RandomCrop(),
               "collate_fn": TensorDataset(torch.randn(N, 3), torch.arange(N))}[kind]  # fmt: skip
    collate = (lambda samples: torch.stack([s[0] * 2 for s in samples])) if kind == "collate_fn" else None
    sampler = StepBatchSampler(N, SEED, _plan(2), rank=1, start_step=3)
    ours = make_loader(dataset, sampler, 0, collate, False)
    assert not isinstance(ours, DataLoader)
    torch.manual_seed(0)
    mine = [b for b, _ in zip(ours, range(9), strict=False)]
    after_mine = torch.rand(3)
    torch.manual_seed(0)
    wrapped = IndexedDataset(dataset, SEED, collated=collate is None)
    torchs = DataLoader(  # (its own generator, as make_loader gave it: starting it draws no global random number)
        wrapped, batch_sampler=sampler, collate_fn=IndexedCollate(collate), generator=torch.Generator()
    )
    reference = [b for b, _ in zip(torchs, range(9), strict=False)]
    assert _same(mine, reference) and torch.equal(torch.rand(3), after_mine)


def test_a_micro_batch_is_its_position_index_pairs_and_pickles_as_plain_ints():
    import pickle

    from workers.data import MicroBatch

    order = GlobalOrder(N, SEED)
    batch = MicroBatch(N - 2, order.take_tensor(N - 2, 4))  # crosses into the next epoch
    assert list(batch) == list(enumerate(order.take(N - 2, 4), N - 2)) and batch[-1] == (N + 1, order.take(N + 1, 1)[0])
    block = StepBatchSampler(N, SEED, _plan(2), rank=0, start_step=0).block(0, 5)
    view = MicroBatch(GBS, block[1][:2])  # a view of the sampler's block of steps
    assert view.indices.untyped_storage().nbytes() == 8 * block.numel() and view.indices.tolist() == order.take(GBS, 2)
    copy = pickle.loads(pickle.dumps(view))
    assert len(pickle.dumps(view)) < 200 and list(copy) == list(view)


class RandomCrop:
    """A dataset with random augmentation from torch's, Python's and NumPy's global generators."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), torch.rand(()).item(), random.random(), float(np.random.rand())])


def test_augmented_samples_are_a_function_of_the_stream_position_only():
    """The same stream positions make the same samples on any world size, after a resume, with loader workers."""
    one = torch.cat([b for _, b in _loader_batches(RandomCrop(), world=1, rank=0, steps=4)])
    torch.manual_seed(123)  # whatever the training code drew before changes nothing
    random.seed(9)
    np.random.seed(9)
    two = [torch.cat([b for _, b in _loader_batches(RandomCrop(), world=2, rank=r, steps=4)]) for r in (0, 1)]
    by_step = torch.cat([torch.cat([two[r][s * 6 : (s + 1) * 6] for r in (0, 1)]) for s in range(4)])
    assert torch.equal(by_step, one)
    resumed = torch.cat([b for _, b in _loader_batches(RandomCrop(), world=1, rank=0, steps=2, start_step=2)])
    assert torch.equal(resumed, one[2 * GBS :])
    workers = torch.cat([b for _, b in _loader_batches(RandomCrop(), world=1, rank=0, steps=4, workers=2)])
    assert torch.equal(workers, one)
    assert len(set(one[:, 1].tolist())) == len(one)  # the augmentation did draw: all different
    # a position is a sample's seed: the same index at another position is augmented otherwise
    assert one[:, 0].tolist().count(one[0, 0].item()) >= 2
    again = [row for row in one if row[0] == one[0, 0]]
    assert not torch.equal(again[0][1:], again[1][1:])


def test_a_sample_is_made_as_if_every_generator_were_seeded_from_its_position():
    data, wrapped = RandomCrop(), IndexedDataset(RandomCrop(), seed=SEED)
    for position, index in [(0, 3), (41, 3), (7, 19)]:
        seed_all(sample_seed(SEED, position))
        expected = data[index]
        random.seed(0)  # whatever the generators hold before
        np.random.seed(0)
        assert torch.equal(wrapped[(position, index)][1], expected)
    assert wrapped[(5, 2)][0] == 2  # (index, sample)
    assert sample_seed(SEED, 1) != sample_seed(SEED, 2) != sample_seed(SEED + 1, 1)
    assert all(0 <= sample_seed(s, p) < 2**63 for s in (0, 2**63 - 1) for p in (0, 10**12))


def test_a_dataset_that_declares_no_randomness_leaves_the_generators_alone():
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    plain = IndexedDataset(RandomCrop(), seed=SEED, seed_samples=False)
    plain[(9, 1)]
    assert not torch.equal(torch.rand(4), expected)  # the fetch drew from the unseeded generator: it moved
    torch.manual_seed(0)
    seeded = IndexedDataset(TensorDataset(torch.arange(4.0)), seed=SEED, collated=True)
    assert not seeded.seed_samples  # a TensorDataset is pure indexing: never seeded
    indices, batch = seeded.__getitems__([(0, 2), (1, 3)])
    assert indices.tolist() == [2, 3] and batch[0].tolist() == [2.0, 3.0]
    assert torch.equal(torch.rand(4), expected)


def test_the_seeder_only_reseeds_a_generator_the_dataset_draws_from():
    seeder = SampleSeeder()
    state = random.getstate()
    seeder.make(11, lambda: torch.rand(()))  # torch only: Python's generator is left where it was
    assert random.getstate() == state and not seeder.python_drawn
    first = seeder.make(12, random.random)
    assert seeder.python_drawn
    random.seed(12)
    assert first == random.random()


def test_the_recorder_appends_one_line_per_micro_step_with_an_attempt_id(run_dir, ctx: DistContext):
    recorder = IndexRecorder(run_dir, ctx, start_step=0)
    recorder.record(0, 0, torch.tensor([3, 1]))
    recorder.record(0, 1, torch.tensor([4]))
    recorder.close()
    again = IndexRecorder(run_dir, ctx, start_step=1)
    again.record(1, 0, torch.tensor([9]))
    again.close()
    rows = [json.loads(line) for line in run_dir.samples_file(0).read_text().splitlines()]
    assert [(r["step"], r["micro"], r["indices"]) for r in rows] == [(0, 0, [3, 1]), (0, 1, [4]), (1, 0, [9])]
    assert {r["rank"] for r in rows} == {0} and {r["world_size"] for r in rows} == {1}
    assert rows[0]["attempt"] == rows[1]["attempt"] != rows[2]["attempt"]
    assert rows[2]["attempt"].endswith("-1")


def test_to_device_keeps_the_batch_structure():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": Pair(torch.ones(2), [torch.zeros(1), "tag"]), "b": (torch.arange(3),), "n": 4}
    moved = to_device(batch, torch.device("cpu"))
    assert type(moved["a"]) is Pair and type(moved["a"].y) is list and type(moved["b"]) is tuple
    assert moved["a"].y[1] == "tag" and moved["n"] == 4 and torch.equal(moved["b"][0], torch.arange(3))
