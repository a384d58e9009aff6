"""Task indices and seeds shared by every episodic data module.

A task is a pure function of ``(seed, split, global task index)``: the same seed gives the same task
stream whatever the number of DataLoader workers or devices. Training draws fresh indices every
epoch (``TaskIndexSampler``); validation and test always use indices ``0..n-1``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["SPLITS", "task_seed", "task_generator", "TaskIndexSampler"]

SPLITS = ("train", "val", "test")


def task_seed(seed: int, split: str, index: int) -> int:
    """A well-mixed 63-bit seed for task ``index`` of ``split`` under the data module's ``seed``."""
    words = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, SPLITS.index(split), index & 0xFFFFFFFF, index >> 32]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]) >> 1


def task_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A ``torch.Generator`` seeded for task ``index`` of ``split``."""
    return torch.Generator().manual_seed(task_seed(seed, split, index))


class TaskIndexSampler(Sampler[int]):
    """Yields the global task indices of the current epoch: ``epoch * n, ..., (epoch + 1) * n - 1``.

    Lightning calls ``set_epoch`` at the start of every training epoch, so each epoch meets new tasks,
    and a run resumed at epoch ``e`` meets the same tasks as one that never stopped.
    """

    def __init__(self, tasks_per_epoch: int) -> None:
        self.tasks_per_epoch = tasks_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.tasks_per_epoch
        return iter(range(start, start + self.tasks_per_epoch))

    def __len__(self) -> int:
        return self.tasks_per_epoch
