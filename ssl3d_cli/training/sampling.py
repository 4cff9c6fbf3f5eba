"""Seeded order and schedule of a training run: which items each step sees, its augmentation seed, its learning rate.

Each is a pure function of (seed, epoch, step, rank), which is what makes ``--resume`` exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class EpochBatches:
    """Batch sampler: a seeded permutation per epoch, global batches split by rank, optional skip.

    Each step takes ``per_rank * world`` items (wrapping around so every batch is full); rank r gets
    its contiguous slice. ``set_epoch`` and ``skip`` make the order a pure function of (seed, epoch).
    """

    def __init__(self, n_items: int, per_rank: int, *, seed: int, world: int = 1, rank: int = 0, steps: int = 0) -> None:
        self.n_items, self.per_rank, self.seed, self.world, self.rank = n_items, per_rank, seed, world, rank
        self.steps = steps or max(1, math.ceil(n_items / (per_rank * world)))
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        need = self.steps * self.per_rank * self.world
        reps = math.ceil(need / self.n_items)
        order = torch.cat([torch.randperm(self.n_items, generator=g) for _ in range(reps)])[:need]
        order = order.view(self.steps, self.world, self.per_rank)
        for s in range(self.start, self.steps):
            yield order[s, self.rank].tolist()


class RunBatches:
    """Batch sampler over every epoch left in a run: epoch ``start_epoch`` from ``start_step``, then each later epoch
    whole, each in :class:`EpochBatches`' order. One loader pass for the whole run, so the first batch of the next
    epoch is read (and prepared on the device) while the current epoch's last step runs, instead of after the
    epoch's bookkeeping."""

    def __init__(self, epochs: EpochBatches, *, start_epoch: int, start_step: int, end_epoch: int) -> None:
        self.epochs, self.start_epoch, self.start_step, self.end_epoch = epochs, start_epoch, start_step, end_epoch

    def __len__(self) -> int:
        return max(0, (self.end_epoch - self.start_epoch) * self.epochs.steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for epoch in range(self.start_epoch, self.end_epoch):
            self.epochs.set_epoch(epoch, self.start_step if epoch == self.start_epoch else 0)
            yield from self.epochs

    def position(self, index: int) -> tuple[int, int]:
        """(epoch, step) of the ``index``-th batch of this pass."""
        epoch, step = divmod(self.start_step + index, self.epochs.steps)
        return self.start_epoch + epoch, step


def step_generator(device: torch.device, seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """A generator for one step's augmentations, seeded from (seed, epoch, step, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + epoch) * 100_003 + step) * 131 + rank)
    return g
