"""Sine-wave regression tasks, the few-shot regression protocol of MAML and Meta-SGD."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .checks import check_int, check_range
from .sampling import TaskLoaders, task_generator

__all__ = ["SineDataModule", "SineTasks"]


class SineTasks(Dataset):
    """Sine tasks y = A sin(x - φ): item ``i`` is task ``i`` of ``split``, a pure function of ``(seed, split, i)``.

    Each item is ``(support_x, support_y, query_x, query_y)`` with shapes ``[shots, 1]`` and ``[queries, 1]``.
    """

    def __init__(self, split: str, length: int, shots: int, queries: int, seed: int,
                 amplitude: tuple[float, float], phase: tuple[float, float], x_range: tuple[float, float]) -> None:
        self.split, self.length, self.shots, self.queries, self.seed = split, length, shots, queries, seed
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g, amplitude, phase = self._draw(index)
        x_low, x_high = self.x_range
        x = x_low + (x_high - x_low) * torch.rand(self.shots + self.queries, 1, generator=g)
        y = amplitude * torch.sin(x - phase)
        return x[: self.shots], y[: self.shots], x[self.shots :], y[self.shots :]

    def curve(self, index: int) -> tuple[float, float]:
        """``(A, φ)`` of task ``index``: its true curve is ``A sin(x - φ)``."""
        _, amplitude, phase = self._draw(index)
        return float(amplitude), float(phase)

    def _draw(self, index: int) -> tuple[torch.Generator, Tensor, Tensor]:
        """Task ``index``'s generator, amplitude and phase; the generator then draws its inputs."""
        g = task_generator(self.seed, self.split, index)
        a_low, a_high = self.amplitude
        p_low, p_high = self.phase
        amplitude = a_low + (a_high - a_low) * torch.rand((), generator=g)
        phase = p_low + (p_high - p_low) * torch.rand((), generator=g)
        return g, amplitude, phase


class SineDataModule(TaskLoaders, L.LightningDataModule):
    """Few-shot sine regression (Finn et al. 2017; Li et al. 2017).

    Each task is y = A sin(x − φ) with A ~ U[0.1, 5.0] and φ ~ U[0, π]; inputs x ~ U[−5, 5]. A task
    gives ``shots`` support points to adapt on and ``queries`` query points to score. Training tasks are
    a pure function of ``(seed, task index)`` and each epoch meets new ones; validation and test use
    fixed task sets, identical on every run. ``meta_batch_size`` tasks make one batch per device.

    Args:
        shots: support points per task (K of K-shot).
        queries: query points per task (of validation and test tasks, and of training tasks unless
            ``train_queries`` is given).
        train_queries: query points of training tasks (``None``: ``queries``). Reptile trains on all of
            a task's points, and its paper's sine tasks have 50 (``shots + train_queries = 50``), while
            the test tasks keep the protocol's ``shots`` and ``queries``.
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch (epoch length = this / meta_batch_size steps).
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set (600 in the literature's protocol).
        amplitude: range of A.
        phase: range of φ.
        x_range: range of x.
        seed: seed of every task stream.
        num_workers: DataLoader worker processes.

    Example:
        >>> dm = SineDataModule(shots=5, meta_batch_size=4)
        >>> dm.setup("fit")
        >>> [t.shape for t in next(iter(dm.train_dataloader()))]
        [torch.Size([4, 5, 1]), torch.Size([4, 5, 1]), torch.Size([4, 10, 1]), torch.Size([4, 10, 1])]
    """

    task = "regression"

    def __init__(
        self,
        shots: int = 5,
        queries: int = 10,
        train_queries: int | None = None,
        meta_batch_size: int = 25,
        train_tasks_per_epoch: int = 10_000,
        val_tasks: int = 200,
        test_tasks: int = 600,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name in ("shots", "queries", "meta_batch_size", "train_tasks_per_epoch", "val_tasks", "test_tasks"):
            check_int(owner, name, locals()[name])
        check_int(owner, "num_workers", num_workers, minimum=0)
        if train_queries is not None:
            check_int(owner, "train_queries", train_queries)
        self.save_hyperparameters()
        self.shots, self.queries, self.train_queries, self.meta_batch_size = shots, queries, train_queries, meta_batch_size
        self.train_tasks_per_epoch, self.val_tasks, self.test_tasks = train_tasks_per_epoch, val_tasks, test_tasks
        self.ranges = {name: check_range(owner, name, value)
                       for name, value in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range))}
        self.seed, self.num_workers = seed, num_workers

    def tasks(self, split: str, length: int) -> SineTasks:
        """The task set of ``split`` (``"train"``, ``"val"`` or ``"test"``) with ``length`` tasks.

        Training tasks have ``train_queries`` query points if it is given.

        Example:
            >>> dm = SineDataModule(shots=5, queries=10, train_queries=45)
            >>> [len(t) for t in dm.tasks("train", 1)[0]], [len(t) for t in dm.tasks("test", 1)[0]]
            ([5, 5, 45, 45], [5, 5, 10, 10])
        """
        queries = self.train_queries if split == "train" and self.train_queries is not None else self.queries
        return SineTasks(split, length, self.shots, queries, self.seed, **self.ranges)
