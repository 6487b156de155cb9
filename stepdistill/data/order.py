"""The order a streamed dataset is read in: a new shuffle every epoch, split across processes, in constant memory.

Epoch e reads the N examples at π_e(0), π_e(1), …, where π_e is a keyed pseudo-random bijection of
[0, N): a four-round Feistel network on the smallest domain of 4^h ≥ N values, applied again to any
value that lands outside [0, N) until it lands inside ("cycle walking", Black & Rogaway, "Ciphers
with Arbitrary Finite Domains", 2002). π_e(i) is computed, never stored, so ten million examples
are shuffled in the memory of a few integers, and a reader's whole position is one count of
examples read, which a checkpoint keeps to resume on exactly the same batches.

With P processes, process p reads the epoch's positions p, p + P, p + 2P, …: ⌈N / P⌉ of them,
the last ones wrapping round to the epoch's first positions (as torch's ``DistributedSampler``
pads), so every example is read once per epoch across the processes and every process reads as
many batches. Batches run on across epoch boundaries: the stream never ends. Process p's batch of
B is then rows p, p + P, … of the batch of P·B one process reads (when P divides N), and each
example comes with its place in the one-process stream, e·N + position in epoch e, which seeds its
crop and flip: P processes read what one reads, cropped alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

FEISTEL_ROUNDS = 4


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed 64-bit mixing function (SplitMix64's finaliser on ``values + key``); uint64 arithmetic wraps."""
    x = values + key
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def shuffled(indices: np.ndarray, size: int, seed: int, epoch: int) -> np.ndarray:
    """π_epoch(indices): where each of ``indices`` (in [0, size)) goes in epoch ``epoch``'s shuffle of
    ``size`` examples, a bijection of [0, size) fixed by ``(seed, epoch)``."""
    if size < 1:
        raise ValueError(f"cannot shuffle an empty dataset (size {size})")
    half_bits = max(1, (int(size - 1).bit_length() + 1) // 2)  # 4^half_bits ≥ size
    mask = np.uint64((1 << half_bits) - 1)
    keys = np.random.SeedSequence([seed, epoch]).generate_state(FEISTEL_ROUNDS, dtype=np.uint64)
    values = np.asarray(indices, dtype=np.uint64).copy()
    outside = np.ones(values.shape, dtype=bool)
    while outside.any():
        x = values[outside]
        left, right = x >> np.uint64(half_bits), x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        values[outside] = (left << np.uint64(half_bits)) | right
        outside = values >= np.uint64(size)
    return values.astype(np.int64)


class EpochOrder:
    """Batches of ``(index, place)`` pairs for process ``rank`` of ``num_processes``: the example to
    read and its place in the one-process stream (which seeds that example's random crop and flip).

    ``examples_read`` is the whole state: setting it (from a checkpoint) restarts the stream exactly
    where a reader that had read that many examples would be."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, num_processes: int = 1,
                 examples_read: int = 0) -> None:
        if not 0 <= rank < num_processes:
            raise ValueError(f"rank {rank} is not one of {num_processes} processes")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.num_processes = rank, num_processes
        self.per_epoch = -(-size // num_processes)  # ⌈N / P⌉ positions per process and epoch
        self.examples_read = examples_read

    def batch_at(self, start: int) -> list[tuple[int, int]]:
        """The batch whose first example is this process's ``start``-th."""
        positions = np.arange(start, start + self.batch_size)
        epochs, within = np.divmod(positions, self.per_epoch)
        slots = (self.rank + within * self.num_processes) % self.size  # the epoch's padded, strided positions
        indices = np.empty_like(slots)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            indices[chosen] = shuffled(slots[chosen], self.size, self.seed, int(epoch))
        return [(int(index), int(place)) for index, place in zip(indices, epochs * self.size + slots)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Batches from the current position on (the position itself moves only by :meth:`advance`:
        a loader reads ahead of what training has taken)."""
        start = self.examples_read
        while True:
            yield self.batch_at(start)
            start += self.batch_size

    def advance(self) -> None:
        """Training took one more batch."""
        self.examples_read += self.batch_size

    @property
    def epoch(self) -> int:
        return self.examples_read // self.per_epoch
