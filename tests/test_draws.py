"""A batch's draws split over processes: one process draws what torch draws, P processes the rows of it."""

from __future__ import annotations

import pytest
import torch

from stepdistill import draws


@pytest.fixture(autouse=True)
def one_process_after():
    yield
    draws.split_over(0, 1)


def drawn_on(rank: int, num_processes: int, draw):
    draws.split_over(rank, num_processes)
    torch.manual_seed(7)
    return draw()


DRAWS = {  # each at a batch of the given size
    "randn": lambda size: draws.randn((size, 3, 4)),
    "randn_like": lambda size: draws.randn_like(torch.empty(size, 3, 4)),
    "randn_like channels-last": lambda size: draws.randn_like(torch.empty(size, 3, 4, 5).to(
        memory_format=torch.channels_last)),  # drawn in its layout, as torch.randn_like draws it
    "rand": lambda size: draws.rand((size,), dtype=torch.float64),
    "randint": lambda size: draws.randint(5, 1000, (size,)),
    "uniform": lambda size: draws.uniform(1.0, 2.0, (size,)),
    "rows": lambda size: draws.rows(lambda shape, scale: scale * torch.randn(shape), (size, 3), scale=2.0),
}


@pytest.mark.parametrize("name", DRAWS)
def test_three_processes_hold_the_rows_of_the_one_process_draw_at_their_global_batch(name):
    draw = DRAWS[name]
    whole = drawn_on(0, 1, lambda: draw(6))
    for rank in range(3):
        part = drawn_on(rank, 3, lambda: draw(2))
        assert part.shape[0] == 2 and torch.equal(part, whole[rank::3])
    after = [drawn_on(rank, 3, lambda: (draw(2), torch.rand(()))[1]) for rank in range(3)]
    assert after[0] == after[1] == after[2]  # every process's generator moved alike: later draws agree


def test_one_process_draws_what_torch_draws():
    strided = torch.empty(4, 3).t()  # non-contiguous: randn_like fills it in memory order
    for ours, torchs in [(lambda: draws.randn((2, 3)), lambda: torch.randn((2, 3))),
                         (lambda: draws.randn_like(strided), lambda: torch.randn_like(strided)),
                         (lambda: draws.rand((5,)), lambda: torch.rand(5)),
                         (lambda: draws.randint(0, 9, (5,)), lambda: torch.randint(9, (5,))),
                         (lambda: draws.uniform(1.0, 2.0, (5,)), lambda: torch.empty(5).uniform_(1.0, 2.0))]:
        torch.manual_seed(3)
        expected = torchs()
        torch.manual_seed(3)
        assert torch.equal(ours(), expected)


def test_a_draw_whose_batch_is_not_outermost_in_memory_is_refused():
    draws.split_over(0, 2)
    with pytest.raises(ValueError, match="the batch is not outermost in memory"):
        draws.randn_like(torch.empty(3, 4).t())


def test_a_rank_outside_the_processes_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not one of 2 processes"):
        draws.split_over(2, 2)
