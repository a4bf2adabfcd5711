"""The order of training samples: a pure function of ``(seed, micro-batch, rank)``, so a checkpoint
stores the position in the data as one counter and resume continues with exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pfclib.seeding import SEED_DATA, derive_seed

__all__ = ["BatchSampler", "DataOrder"]


class DataOrder:
    """Seeded, epoch-aware, rank-sharded order of dataset indices.

    Epoch ``e`` is ``randperm(num_samples)`` drawn from a generator seeded by ``(seed, e)``; it is cut
    into ``num_samples // (batch_size * world_size)`` global micro-batches (the remainder is
    dropped, so every rank always sees ``batch_size`` samples); rank ``r`` takes rows
    ``[r * batch_size, (r + 1) * batch_size)`` of each. Micro-batch ``m`` (counting from the start of
    training, across epochs) is therefore a pure function of ``(seed, m, rank)``.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, seed: int):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.global_batch = self.batch_size * self.world_size
        if self.num_samples < self.global_batch:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch "
                f"(batch_size {self.batch_size} x {self.world_size} processes = {self.global_batch})"
            )
        self.batches_per_epoch = self.num_samples // self.global_batch
        self._cache: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The index order of ``epoch`` (int64, ``(num_samples,)``)."""
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, SEED_DATA, epoch))
            self._cache = (epoch, torch.randperm(self.num_samples, generator=gen))
        return self._cache[1]

    def indices(self, micro_batch: int, rank: int) -> list[int]:
        """Dataset indices of ``rank``'s part of global micro-batch ``micro_batch``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        epoch, b = divmod(int(micro_batch), self.batches_per_epoch)
        start = b * self.global_batch + rank * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size].tolist()

    def state(self, micro_batches: int) -> dict[str, int]:
        """A plain dict locating the position after ``micro_batches`` consumed micro-batches."""
        epoch, b = divmod(int(micro_batches), self.batches_per_epoch)
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "micro_batches": int(micro_batches),
            "epoch": epoch,
            "batch_in_epoch": b,
            "samples_in_epoch": b * self.global_batch,
        }

    def position_from(self, state: dict[str, int]) -> int:
        """The micro-batch index to continue from after a checkpoint's ``state``. With the same
        global batch this is exactly the saved position; with a different one (another number of
        processes) it is the first whole batch at or after the saved sample offset in the same epoch."""
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint data order (num_samples={state['num_samples']}, seed={state['seed']}) does not "
                f"match this run (num_samples={self.num_samples}, seed={self.seed})"
            )
        if state["global_batch"] == self.global_batch:
            return int(state["micro_batches"])
        within = -(-int(state["samples_in_epoch"]) // self.global_batch)  # ceil: never repeat a sample
        if within >= self.batches_per_epoch:
            return (int(state["epoch"]) + 1) * self.batches_per_epoch
        return int(state["epoch"]) * self.batches_per_epoch + within


class BatchSampler:
    """Index lists of micro-batches ``start .. stop - 1`` for one rank (a DataLoader batch_sampler)."""

    def __init__(self, order: DataOrder, rank: int, start: int, stop: int):
        self.order, self.rank, self.start, self.stop = order, rank, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for m in range(self.start, self.stop):
            yield self.order.indices(m, self.rank)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
