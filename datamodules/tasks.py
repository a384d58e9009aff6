"""N-way K-shot task sets drawn from a learn2learn ``MetaDataset``: item ``i`` is task ``i`` of a split.

A task is a pure function of ``(seed, split, global task index)`` (see :mod:`datamodules.sampling`):
learn2learn's task transforms (``NWays``, ``KShots``, ``LoadData``, ``RemapLabels``) run with Python's
and torch's global random generators seeded from :func:`~datamodules.sampling.task_seed` and restored
afterwards (:func:`~datamodules.sampling.seeded_global_rngs`), so the same seed gives the same tasks
whatever the number of workers or devices. A task's images are decoded when it is read, in the
DataLoader's worker processes.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .learn2learn_import import import_learn2learn
from .sampling import seeded_global_rngs, task_seed

if TYPE_CHECKING:
    from learn2learn.data import MetaDataset

__all__ = ["EpisodicTasks", "NWaysWithinGroup", "split_support_query"]


def split_support_query(x: Tensor, y: Tensor, ways: int, shots: int,
                        queries: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a task's ``ways * (shots + queries)`` images into support and query sets, per class.

    ``y`` holds labels ``0..ways-1``, each exactly ``shots + queries`` times. Of each class's images (in
    the sampled order), the first ``shots`` go to the support set and the remaining ``queries`` to the
    query set, so the two sets never share an image. Both are ordered by class.
    """
    per_class = shots + queries
    counts = torch.bincount(y, minlength=ways)
    if len(counts) != ways or not bool((counts == per_class).all()):
        raise RuntimeError(f"A sampled task has class counts {counts.tolist()}; expected {per_class} for each "
                           f"of {ways} classes. This is a bug in the task transforms.")
    order = torch.argsort(y, stable=True)
    x = x[order].view(ways, per_class, *x.shape[1:])
    labels = torch.arange(ways, dtype=torch.int64)
    support_x, query_x = x[:, :shots].flatten(0, 1), x[:, shots:].flatten(0, 1)
    return support_x, labels.repeat_interleave(shots), query_x, labels.repeat_interleave(queries)


class NWaysWithinGroup:
    """A learn2learn task transform: ``n`` classes, all of one group (e.g. one Omniglot alphabet).

    Used in place of learn2learn's ``NWays`` as the first transform of a ``Taskset``: it picks a group
    uniformly among those with at least ``n`` classes, then ``n`` of its classes, with Python's global
    ``random`` (seeded per task by :class:`EpisodicTasks`). The protocol of Lake et al.'s one-shot
    challenge, where each run's 20 characters come from one alphabet.

    Args:
        dataset: the split's ``learn2learn.data.MetaDataset``.
        n: classes per task.
        groups: the group of every class label of ``dataset``.
    """

    def __init__(self, dataset: MetaDataset, n: int, groups: Mapping[int, str]) -> None:
        self.dataset, self.n = dataset, n
        members: dict[str, list[int]] = {}
        for label in sorted(dataset.labels):
            members.setdefault(groups[label], []).append(label)
        self.members = {group: labels for group, labels in sorted(members.items()) if len(labels) >= n}
        if not self.members:
            largest = max(members.items(), key=lambda item: len(item[1]))
            raise ValueError(f"No group has {n} classes for tasks drawn within one group: the largest, "
                             f"'{largest[0]}', has {len(largest[1])}. Lower `ways` or turn off within-group tasks.")

    def __call__(self, task_description: list | None) -> list:
        if task_description is not None:
            raise ValueError("NWaysWithinGroup must be the first task transform (it starts a task description).")
        from learn2learn.data.task_dataset import DataDescription

        group = random.choice(list(self.members))
        labels = random.sample(self.members[group], k=self.n)
        return [DataDescription(index) for label in labels for index in self.dataset.labels_to_indices[label]]


class EpisodicTasks(Dataset):
    """N-way K-shot tasks of one split: item ``i`` is task ``i``, a pure function of ``(seed, split, i)``.

    Each item is ``(support_x [N*K, C, H, W], support_y [N*K], query_x [N*Q, C, H, W], query_y [N*Q])``
    with labels ``0..N-1``. Tasks come from a learn2learn ``Taskset`` with the usual task transforms:
    ``NWays(N)`` (or :class:`NWaysWithinGroup` with ``groups``), ``KShots(K + Q)``, ``LoadData`` and
    ``RemapLabels``, run under the task's seed.

    Args:
        dataset: the split's ``learn2learn.data.MetaDataset``.
        split: ``"train"``, ``"val"`` or ``"test"`` (part of the task seed).
        length: number of tasks (the length of the dataset; indices beyond it are valid too).
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        seed: the data module's seed.
        groups: the group of every class label: each task's classes then come from one group.
    """

    def __init__(self, dataset: MetaDataset, split: str, length: int, ways: int, shots: int, queries: int,
                 seed: int, groups: Mapping[int, str] | None = None) -> None:
        l2l = import_learn2learn()
        transforms = l2l.data.transforms
        self.dataset, self.split, self.length, self.ways, self.shots, self.queries, self.seed = (
            dataset, split, length, ways, shots, queries, seed)
        self.groups = None if groups is None else dict(groups)
        first = transforms.NWays(dataset, n=ways) if groups is None else NWaysWithinGroup(dataset, ways, groups)
        self.taskset = l2l.data.Taskset(dataset, task_transforms=[
            first,
            transforms.KShots(dataset, k=shots + queries),
            transforms.LoadData(dataset),
            transforms.RemapLabels(dataset),
        ])

    def __len__(self) -> int:
        return self.length

    def __reduce__(self):
        # DataLoader workers started by spawn or forkserver unpickle this; learn2learn must be imported
        # quietly there before the pickled learn2learn objects import it (with gym's banner).
        arguments = (self.dataset, self.split, self.length, self.ways, self.shots, self.queries, self.seed,
                     self.groups)
        return _restore_tasks, (pickle.dumps(arguments),)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with seeded_global_rngs(task_seed(self.seed, self.split, int(index))):
            description = self.taskset.sample_task_description()
            x, y = self.taskset.get_task(description)  # decodes the images
        return split_support_query(x, y, self.ways, self.shots, self.queries)


def _restore_tasks(arguments: bytes) -> EpisodicTasks:
    import_learn2learn()
    return EpisodicTasks(*pickle.loads(arguments))
