"""The streamed data's order: a bijection per epoch, disjoint and covering shards, and resumable exactly."""

from __future__ import annotations

import numpy as np
import pytest

from stepdistill.data.order import EpochOrder, shuffled


@pytest.mark.parametrize("size", [1, 2, 5, 64, 1000, 4097])
def test_each_epoch_is_a_permutation(size):
    for epoch in (0, 1):
        assert sorted(shuffled(np.arange(size), size, seed=0, epoch=epoch)) == list(range(size))


def test_the_shuffle_is_fixed_by_seed_and_epoch_and_differs_between_them():
    order = shuffled(np.arange(1000), 1000, seed=0, epoch=0)
    assert np.array_equal(order, shuffled(np.arange(1000), 1000, seed=0, epoch=0))
    assert not np.array_equal(order, shuffled(np.arange(1000), 1000, seed=0, epoch=1))
    assert not np.array_equal(order, shuffled(np.arange(1000), 1000, seed=1, epoch=0))
    assert not np.array_equal(order, np.arange(1000))
    assert abs(np.corrcoef(order, np.arange(1000))[0, 1]) < 0.1  # no trace of the file order left


@pytest.mark.parametrize("size, processes", [(12, 3), (10, 3), (7, 2), (5, 8)])
def test_processes_read_disjoint_shards_that_cover_the_data_each_epoch(size, processes):
    per_epoch = -(-size // processes)
    shards = [[index for index, _ in EpochOrder(size, per_epoch, seed=0, rank=rank, num_processes=processes).batch_at(0)]
              for rank in range(processes)]
    assert {len(shard) for shard in shards} == {per_epoch}  # as many batches on every process
    everything = [index for shard in shards for index in shard]
    assert sorted(set(everything)) == list(range(size))  # every example read this epoch
    assert len(everything) - len(set(everything)) == per_epoch * processes - size  # repeats: only the padding


def test_a_resumed_order_yields_the_batches_of_an_uninterrupted_one():
    uninterrupted = EpochOrder(10, batch_size=4, seed=0)
    batches = iter(uninterrupted)
    expected = [next(batches) for _ in range(7)]  # 28 examples: across two epoch boundaries
    resumed = EpochOrder(10, batch_size=4, seed=0, examples_read=3 * 4)
    batches = iter(resumed)
    assert [next(batches) for _ in range(4)] == expected[3:]
    assert [position for _, position in expected[3]] == [12, 13, 14, 15]
    first_epoch = [index for batch in expected for index, position in batch if position < 10]
    assert sorted(first_epoch) == list(range(10))


def test_reading_ahead_does_not_move_the_position():
    order = EpochOrder(10, batch_size=4, seed=0)
    batches = iter(order)
    next(batches), next(batches)
    assert order.examples_read == 0
    order.advance()
    assert order.examples_read == 4 and order.epoch == 0


@pytest.mark.parametrize("start", [0, 5])  # the first batch; one across the processes' epoch boundary (6 each)
def test_two_processes_read_the_rows_of_one_process_batch_keyed_alike(start):
    one = EpochOrder(12, batch_size=4, seed=0).batch_at(2 * start)
    two = [EpochOrder(12, batch_size=2, seed=0, rank=rank, num_processes=2).batch_at(start) for rank in (0, 1)]
    assert [pair for rows in zip(*two) for pair in rows] == one  # rows 0, 2 on process 0; 1, 3 on process 1
