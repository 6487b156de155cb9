"""A training batch's random draws, the same however many processes share the batch.

A step's global batch of P·B examples is split over P processes, process p holding its rows p,
p + P, p + 2P, … (the order :mod:`stepdistill.data.order` deals examples in). Each per-example draw
here draws the numbers of the *whole* global batch from torch's generator, seeded alike on every
process, and keeps this process's rows. An example therefore gets the noise, timestep and pick that
a one-process run with batch P·B gives it, so P processes train like one up to the order of
floating-point sums; and every process's generator advances alike, so a draw that is not per
example (how many student steps to simulate, say) is the same on all of them. On one process each
function draws exactly what the torch function it is named after draws.

The trainer calls :func:`split_over` once; every draw of a training step goes through this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_rank, _num_processes = 0, 1


def split_over(rank: int, num_processes: int) -> None:
    """Draw for process ``rank`` of ``num_processes`` from now on."""
    if not 0 <= rank < num_processes:
        raise ValueError(f"rank {rank} is not one of {num_processes} processes")
    global _rank, _num_processes
    _rank, _num_processes = rank, num_processes


def rows(draw: Callable[..., torch.Tensor], shape: Sequence[int], **kwargs) -> torch.Tensor:
    """``draw(shape, **kwargs)`` for this process's rows of the global batch (``shape[0]`` is the
    process's batch): the global batch's draw, its rows ``rank::num_processes``."""
    if _num_processes == 1:
        return draw(tuple(shape), **kwargs)
    whole = draw((shape[0] * _num_processes, *shape[1:]), **kwargs)
    return whole[_rank::_num_processes].contiguous()


def randn(shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal numbers of ``shape``, row by row as the global batch draws them."""
    return rows(torch.randn, shape, device=device, dtype=dtype)


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """Standard normal numbers shaped like ``x``. ``torch.randn_like`` draws in ``x``'s memory layout,
    so a channels-last ``x`` (what the VAE leaves on the CPU) gets other numbers than a contiguous one;
    several processes draw the global batch in that same layout and keep their rows."""
    if _num_processes == 1:
        return torch.randn_like(x)
    strides = torch.empty_like(x, device="meta").stride()  # the layout torch.randn_like would fill
    if any(strides[d] > strides[0] for d in range(1, x.ndim) if x.shape[d] > 1):
        raise ValueError(f"cannot split a draw over processes when the batch is not outermost in memory "
                         f"(strides {strides})")
    whole = torch.empty_strided((x.shape[0] * _num_processes, *x.shape[1:]), strides, dtype=x.dtype, device=x.device)
    return torch.randn_like(whole)[_rank::_num_processes]


def rand(shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``shape``."""
    return rows(torch.rand, shape, dtype=dtype)


def randint(low: int, high: int, shape: Sequence[int]) -> torch.Tensor:
    """Integers drawn uniformly from {low, …, high − 1}."""
    return rows(lambda size: torch.randint(low, high, size), shape)


def uniform(low: float, high: float, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Numbers drawn uniformly from [low, high) (``Tensor.uniform_``)."""
    return rows(lambda size: torch.empty(size, device=device).uniform_(low, high), shape)
