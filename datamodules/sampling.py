"""Task indices and seeds shared by every episodic data module.

A task is a pure function of ``(seed, split, global task index)``: the same seed gives the same task
stream whatever the number of DataLoader workers or devices. Training draws fresh indices every
epoch (``TaskIndexSampler``); validation and test always use indices ``0..n-1``
(``FixedTaskSampler``).

Several devices (DDP, one process per device, on one or several nodes): ``meta_batch_size`` is per
device, so one optimiser step covers ``world_size * meta_batch_size`` tasks. Both samplers shard the
global index stream themselves, rank ``r`` of ``W`` taking indices ``r, r + W, r + 2W, ...``: the
``k``-th meta-batches of all ranks together are exactly the ``k``-th meta-batch of one process with
``meta_batch_size * W`` tasks, so a run on ``W`` devices meets the same tasks, step by step, as a
run on one device with a ``W`` times larger meta-batch. Both samplers are
:class:`~torch.utils.data.DistributedSampler` subclasses, so Lightning leaves them alone instead of
wrapping them in its own distributed sampler (which would shuffle the training stream with a seed of
its own, and pad the validation set by repeating tasks, counting them twice).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .checks import check_int

__all__ = ["SPLITS", "task_seed", "task_generator", "seeded_global_rngs", "TaskIndexSampler", "FixedTaskSampler",
           "TaskDataLoader", "TaskLoaders", "WorkerDeathNamingDataLoader", "killed_child"]

SPLITS = ("train", "val", "test")


def task_seed(seed: int, split: str, index: int) -> int:
    """A well-mixed 63-bit seed for task ``index`` of ``split`` under the data module's ``seed``."""
    words = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, SPLITS.index(split), index & 0xFFFFFFFF, index >> 32]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]) >> 1


def task_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A ``torch.Generator`` seeded for task ``index`` of ``split``."""
    return torch.Generator().manual_seed(task_seed(seed, split, index))


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` and torch's CPU generator for one task, and restore both afterwards.

    learn2learn's ``NWays``, ``KShots`` and ``RemapLabels`` draw from the global ``random`` module and
    torchvision's random augmentations from torch's global CPU generator; seeding both from the task's
    seed makes a task a pure function of its index. Restoring them leaves the caller's random streams
    untouched (with ``num_workers=0`` this runs in the training process).
    """
    state = random.getstate()
    random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        random.setstate(state)


class _RankShare(DistributedSampler):
    """Base of the task samplers: this process's share of a global index stream.

    The rank and the number of processes are read when the sampler is iterated or measured (from
    ``torch.distributed`` once its process group exists, else one process), unless given: a data
    module can build its loaders before the process group is up. ``DistributedSampler.__init__`` is
    deliberately not called (it insists on a process group); only the type matters to Lightning.
    """

    def __init__(self, num_tasks: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        check_int(type(self).__name__, "num_tasks", num_tasks)
        if (num_replicas is None) != (rank is None):
            raise ValueError("Give both `num_replicas` and `rank`, or neither (then torch.distributed decides).")
        if num_replicas is not None and not (isinstance(num_replicas, int) and num_replicas >= 1 and 0 <= rank < num_replicas):
            raise ValueError(f"Need num_replicas >= 1 and 0 <= rank < num_replicas; got {num_replicas!r} and {rank!r}.")
        self.num_tasks = num_tasks
        self._num_replicas, self._rank = num_replicas, rank
        self.epoch = 0
        self.shuffle, self.seed, self.drop_last = False, 0, False  # DistributedSampler's attributes, for inspection

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:  # type: ignore[override]
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _check_world(self) -> tuple[int, int]:
        world, rank = self.num_replicas, self.rank
        if self.num_tasks < world:
            raise ValueError(
                f"{type(self).__name__} has {self.num_tasks} tasks for {world} processes: every process needs at "
                f"least one task. Use at least {world} tasks (ideally a multiple of devices x meta_batch_size)."
            )
        return world, rank


class TaskIndexSampler(_RankShare):
    """Training tasks: the global indices ``epoch * n, ..., (epoch + 1) * n - 1`` of the current epoch.

    Lightning calls ``set_epoch`` at the start of every training epoch, so each epoch meets new tasks,
    and a run resumed at epoch ``e`` meets the same tasks as one that never stopped. On ``W``
    processes rank ``r`` yields ``start + r, start + r + W, ...``: ``n // W`` indices on every rank
    (so every rank runs the same number of steps; the ``n % W`` last tasks of an epoch are skipped),
    and step ``k`` of all ranks covers the tasks of step ``k`` of one process with a ``W`` times
    larger meta-batch.

    ``start`` is the place in the epoch's global stream where iteration begins: 0, or where a resumed
    run left off (:meth:`load_state_dict`). It holds for the epoch it was set for; ``set_epoch`` to
    another epoch starts that one from its first task. ``len()`` stays the length of a whole epoch,
    as Lightning counts the batches of a resumed epoch from where it stopped.

    Args:
        tasks_per_epoch: ``n``, global tasks per epoch (over all processes); a multiple of
            ``devices * meta_batch_size`` gives whole meta-batches.
        num_replicas, rank: this process's place; by default from ``torch.distributed``.
    """

    def __init__(self, tasks_per_epoch: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(tasks_per_epoch, num_replicas, rank)
        self.drop_last = True
        self.start = 0

    @property
    def tasks_per_epoch(self) -> int:
        return self.num_tasks

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def per_rank(self, start: int | None = None) -> int:
        """How many indices each rank yields from global position ``start`` (default: ``self.start``) on."""
        world, _ = self._check_world()
        start = self.start if start is None else start
        return max(0, world * (self.num_tasks // world) - start) // world

    def __iter__(self) -> Iterator[int]:
        world, rank = self._check_world()
        first = self.epoch * self.num_tasks + self.start + rank
        return iter(range(first, first + world * self.per_rank(), world))

    def __len__(self) -> int:
        world, _ = self._check_world()
        return self.num_tasks // world

    def state_dict(self) -> dict[str, int]:
        """Where the next iteration starts: ``epoch`` and ``start``, the global tasks of that epoch already taken."""
        return {"epoch": self.epoch, "start": self.start, "tasks_per_epoch": self.num_tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("tasks_per_epoch", self.num_tasks) != self.num_tasks:
            warnings.warn(
                f"The checkpoint's training epochs had {state['tasks_per_epoch']} tasks, this run's have "
                f"{self.num_tasks}: epoch {state['epoch']} starts again from its first task.", stacklevel=2)
            self.epoch, self.start = int(state["epoch"]), 0
            return
        self.epoch, self.start = int(state["epoch"]), min(int(state["start"]), self.num_tasks)


class FixedTaskSampler(_RankShare):
    """Validation and test tasks: the fixed indices ``0, ..., n - 1``, each on exactly one process.

    On ``W`` processes rank ``r`` yields ``r, r + W, ...`` with no padding: ranks may hold one task
    more or fewer, and no task is counted twice (Lightning's own ``DistributedSampler`` would repeat
    tasks to even the ranks out). Metrics that sum over tasks and all-reduce by summation (such as
    :class:`~metasgd_lightning.training.metrics.TaskMeanCI`) then equal those of one process.

    Args:
        num_tasks: ``n``, the size of the fixed task set (at least the number of processes).
        num_replicas, rank: this process's place; by default from ``torch.distributed``.
    """

    def __iter__(self) -> Iterator[int]:
        world, rank = self._check_world()
        return iter(range(rank, self.num_tasks, world))

    def __len__(self) -> int:
        world, rank = self._check_world()
        return len(range(rank, self.num_tasks, world))


def quiet_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the task loaders: a worker leaves Ctrl-C to the main process and ends quietly on SIGTERM.

    A scheduler signals every process of a job at once (and Ctrl-C in a terminal the whole process
    group). A worker killed by such a signal makes PyTorch raise in the training process at once
    ("DataLoader worker ... is killed by signal"), before it can finish its step and save. So a worker
    ignores SIGINT and SIGUSR1, and on SIGTERM (also what ``Process.terminate`` sends when the main
    process shuts workers down) exits with status 0, which PyTorch does not count as a failure.
    """
    for name in ("SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


class WorkerDeathNamingDataLoader(DataLoader):
    """A ``DataLoader`` that names a worker process killed while it handed over a batch (:class:`_NamesKilledWorker`)."""

    def __iter__(self) -> Iterator[Any]:
        return _names_killed_worker(super().__iter__(), self.num_workers)


def _names_killed_worker(iterator: Iterator[Any], num_workers: int) -> Iterator[Any]:
    return _NamesKilledWorker(iterator) if num_workers > 0 else iterator


class _NamesKilledWorker(Iterator):
    """A multi-worker loader's iterator that names a worker killed while it handed over a batch.

    PyTorch names a worker it finds dead ("DataLoader worker (pid N) is killed by signal: Killed."). But a
    worker killed while a batch of its is in transit (the out-of-memory killer, say) breaks the hand-over
    of the batch's shared memory first (``ConnectionResetError``, ``EOFError``), and PyTorch, which finds
    the worker not yet gone, raises that bare error. This waits for a killed child process to show and
    names it the same way; any other error is raised as it was.
    """

    def __init__(self, iterator: Iterator[Any], wait: float = 2.0) -> None:
        self.iterator, self.wait = iterator, wait  # seconds a worker may take to finish dying

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except (ConnectionError, EOFError) as error:
            killed = killed_child(self.wait)
            if killed is None:
                raise
            pid, number = killed
            raise RuntimeError(
                f"DataLoader worker (pid {pid}) is killed by signal: {signal.Signals(number).name}, while handing over a "
                f"batch ({type(error).__name__}: {error}). The out-of-memory killer sends SIGKILL: fewer `num_workers` "
                "or a smaller `meta_batch_size` use less memory.") from error

    def __len__(self) -> int:
        return len(self.iterator)


def killed_child(wait: float = 2.0) -> tuple[int, int] | None:
    """``(pid, signal)`` of a child process of this one that a signal killed and that is not yet reaped (it is left
    so); waits up to ``wait`` seconds for one still dying. None if there is none, or if another ended child is
    waiting to be reaped first."""
    deadline = time.monotonic() + wait
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no child at all
            return None
        if info is not None:
            return (info.si_pid, info.si_status) if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


class TaskDataLoader(WorkerDeathNamingDataLoader):
    """The training ``DataLoader`` over a :class:`TaskIndexSampler`, resumable mid-epoch through Lightning.

    Lightning saves the ``state_dict()`` of a training loader that has one in every checkpoint and
    hands it back to ``load_state_dict`` on resuming. The state is the sampler's epoch and the global
    tasks of it taken: those of the batches this loader handed to the training loop (batches that
    workers prepared ahead are not counted), times the number of processes. A resumed loader yields
    the rest of that epoch, on any number of processes. The underlying iterator is made at the first
    ``next()``, after Lightning's ``set_epoch``, so a resumed state meant for another epoch is dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._origin: tuple[int, int] | None = None  # (epoch, start) of the current iteration
        self._batches = 0  # batches the current iteration handed out

    @property
    def resumable(self) -> bool:
        """Whether the sampler is a :class:`TaskIndexSampler` (Lightning may swap it, e.g. for ``overfit_batches``)."""
        return isinstance(self.sampler, TaskIndexSampler)

    def __iter__(self) -> Iterator[Any]:
        return _CountedBatches(self) if self.resumable else super().__iter__()

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if not self.resumable:
            return {}
        if self._origin is None:  # not iterated since it was made or loaded
            return sampler.state_dict()
        epoch, start = self._origin
        taken = min(self._batches * self.batch_size, sampler.per_rank(start))
        return {"epoch": epoch, "start": start + taken * sampler.num_replicas, "tasks_per_epoch": sampler.num_tasks,
                "world_size": sampler.num_replicas, "meta_batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if not self.resumable or not state:
            return
        saved = state.get("world_size", sampler.num_replicas) * state.get("meta_batch_size", self.batch_size)
        if saved != sampler.num_replicas * self.batch_size:
            warnings.warn(
                f"The checkpoint was trained with {saved} tasks per step over all devices, this run takes "
                f"{sampler.num_replicas * self.batch_size}: the task stream goes on where it stopped, but the "
                "steps no longer match the run's before (keep devices x meta_batch_size to resume exactly).",
                stacklevel=2)
        sampler.load_state_dict(state)
        self._origin, self._batches = None, 0


class _CountedBatches(Iterator):
    """A :class:`TaskDataLoader`'s iterator: made at the first ``next()``, counting what it hands out."""

    def __init__(self, loader: TaskDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator | None = None

    def __next__(self) -> Any:
        loader = self.loader
        if self.iterator is None:
            sampler: TaskIndexSampler = loader.sampler
            loader._origin, loader._batches = (sampler.epoch, sampler.start), 0
            self.iterator = _names_killed_worker(DataLoader.__iter__(loader), loader.num_workers)
        batch = next(self.iterator)
        loader._batches += 1
        return batch


class TaskLoaders:
    """The DataLoaders of an episodic data module, built from its ``tasks(split, length)``.

    Training meets new tasks every epoch (:class:`TaskIndexSampler`, in a resumable
    :class:`TaskDataLoader`); validation, test and prediction use the fixed task sets
    (:class:`FixedTaskSampler`). Under DDP both give each rank its own share, so Lightning does not
    wrap them. Needs the attributes ``meta_batch_size``, ``num_workers``, ``train_tasks_per_epoch``,
    ``val_tasks`` and ``test_tasks``.
    """

    def _loader(self, split: str, length: int, sampler: DistributedSampler,
                loader: type = WorkerDeathNamingDataLoader) -> DataLoader:
        return loader(self.tasks(split, length), batch_size=self.meta_batch_size, sampler=sampler,
                      num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                      worker_init_fn=quiet_stop_signals if self.num_workers > 0 else None)

    def train_dataloader(self) -> TaskDataLoader:
        return self._loader("train", self.train_tasks_per_epoch, TaskIndexSampler(self.train_tasks_per_epoch),
                            TaskDataLoader)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_tasks, FixedTaskSampler(self.val_tasks))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_tasks, FixedTaskSampler(self.test_tasks))

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_tasks, FixedTaskSampler(self.test_tasks))
