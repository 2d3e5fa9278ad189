"""The global order's keyed permutation (workers/data/feistel.py, the ``feistel`` scheme of workers/data/order.py):
a permutation of [0, n) for any n up to 2**63, computed per position, statistically unremarkable, and the
``randperm`` scheme kept for checkpoints written before it."""

from __future__ import annotations

import pytest
import torch

from workers.config import config_from_dict, plan_batches
from workers.contract import TrainState
from workers.data import GlobalOrder, StepBatchSampler
from workers.data.feistel import KeyedPermutation
from workers.errors import CheckpointError, ConfigError


@pytest.mark.parametrize("n", [*range(1, 70), 1000, 1023, 1024, 1025, 65537])
def test_the_keyed_permutation_is_a_permutation_of_exactly_n(n):
    values = KeyedPermutation(n, key=7)(torch.arange(n))
    assert values.dtype == torch.long and sorted(values.tolist()) == list(range(n))


def test_every_epoch_of_1000_samples_visits_every_index_once_in_a_new_order():
    order = GlobalOrder(1000, seed=3)
    epochs = [order.permutation(e) for e in range(30)]
    assert all(sorted(p.tolist()) == list(range(1000)) for p in epochs)
    assert len({tuple(p.tolist()) for p in epochs}) == 30
    assert order.take(0, 3000) == torch.cat(epochs[:3]).tolist()  # the stream is the epochs, end to end


def _position_of(perm: torch.Tensor) -> torch.Tensor:
    where = torch.empty_like(perm)
    where[perm] = torch.arange(len(perm))
    return where.double()


def test_positions_of_an_index_across_epochs_are_not_correlated():
    n, epochs = 1000, 40
    order = GlobalOrder(n, seed=11)
    positions = [_position_of(order.permutation(e)) for e in range(epochs)]
    # for independent uniform permutations r has sd 1/sqrt(n) ~ 0.032: 0.15 is beyond 4.5 sd
    r_next = [torch.corrcoef(torch.stack([positions[e], positions[e + 1]]))[0, 1].item() for e in range(epochs - 1)]
    assert max(abs(r) for r in r_next) < 0.15, r_next
    assert abs(sum(r_next) / len(r_next)) < 0.03  # and no drift in one direction
    identity = torch.arange(n).double()
    r_index = [torch.corrcoef(torch.stack([positions[e], identity]))[0, 1].item() for e in range(epochs)]
    assert max(abs(r) for r in r_index) < 0.15, r_index  # the order is not the index order, shuffled a little
    # neighbours in the order are far apart in the dataset, as in a random permutation (mean gap n/3)
    gaps = [(p[1:] - p[:-1]).abs().double().mean().item() for p in (order.permutation(e) for e in range(epochs))]
    assert all(0.28 * n < g < 0.39 * n for g in gaps), gaps
    # every index reaches the first tenth of some epoch's order at a uniform rate (no index is always late)
    early = torch.stack([p < n // 10 for p in positions]).double().mean(0)
    assert 0.07 < early.mean().item() < 0.13 and early.max().item() < 0.5


@pytest.mark.parametrize("n", [10**12, 2**63 - 25, 2**63])
def test_an_order_of_any_size_up_to_2_63_is_computed_per_position(n):
    order = GlobalOrder(n, seed=1)
    head, tail = order.take(0, 4096), order.take(n - 4096, 4096)
    assert all(0 <= i < n for i in head + tail) and len(set(head + tail)) == 8192
    assert GlobalOrder(n, seed=1).take(n - 4096, 4096) == tail  # a function of (seed, epoch, position) alone
    assert GlobalOrder(n, seed=2).take(0, 64) != head[:64]
    if n < 2**62:
        assert order.take(n - 2, 4)[2:] == order.take(n, 2)  # across the epoch boundary


def test_a_ranks_block_of_steps_is_the_streams_slices_across_epochs():
    plan = plan_batches(config_from_dict({}, ["data.global_batch_size=12"]), 3)
    for scheme in ("feistel", "randperm"):
        sampler = StepBatchSampler(20, 5, plan, rank=1, start_step=2, scheme=scheme)
        order = GlobalOrder(20, 5, scheme)
        block = sampler.block(2, 9)  # 9 steps of 12 over a dataset of 20: five epochs
        assert block.tolist() == [order.take(s * 12 + 4, 4) for s in range(2, 11)]


def test_the_randperm_scheme_is_todays_order_for_checkpoints_written_before_the_feistel_one():
    old = GlobalOrder(50, 9, "randperm")
    gen = torch.Generator().manual_seed(9 * 1_000_003 + 2)
    assert old.permutation(2).tolist() == torch.randperm(50, generator=gen).tolist()
    assert GlobalOrder(50, 9).permutation(2).tolist() != old.permutation(2).tolist()
    with pytest.raises(ValueError, match="unknown order scheme 'shuffle'"):
        GlobalOrder(50, 9, "shuffle")


def test_train_state_records_the_order_and_reads_a_state_without_one():
    base = '{"step": 4, "samples_seen": 48, "world_size": 2, "global_batch_size": 12, "seed": 0'
    assert TrainState.from_json(base + "}").order is None  # before the scheme was recorded: randperm
    assert TrainState.from_json(base + ', "order": "feistel"}').order == "feistel"
    with pytest.raises(CheckpointError, match="'order' = 'sorted' is not one of feistel, randperm"):
        TrainState.from_json(base + ', "order": "sorted"}')


def test_data_order_is_checked_by_the_config():
    assert config_from_dict({}, []).data.order == "feistel"
    with pytest.raises(ConfigError, match=r"data\.order"):
        config_from_dict({}, ["data.order=shuffled"])
