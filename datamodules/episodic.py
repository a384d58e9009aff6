"""The base of the episodic image data modules: :class:`EpisodicDataModule`.

A data module says where a split's images come from (an :class:`~datamodules.images.ImageSource`)
and how they are preprocessed (an :class:`~datamodules.preprocessing.ImageTransform`); this base
checks the split, indexes its classes with a learn2learn ``MetaDataset`` and serves N-way K-shot
tasks (:class:`~datamodules.tasks.EpisodicTasks`) through the task samplers of
:mod:`datamodules.sampling`.

The helpers that lived here before the package was split by job are still importable from here:
argument checks (:mod:`datamodules.checks`), preprocessing (:mod:`datamodules.preprocessing`), image
sources (:mod:`datamodules.images`), task sets (:mod:`datamodules.tasks`), task seeding
(:mod:`datamodules.sampling`) and downloads (:mod:`datamodules.downloads`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
from PIL import Image

from .checks import check_fractions, check_int, check_normalisation  # noqa: F401  (check_fractions: moved)
from .downloads import DownloadError, cleanup_on_failure, describe_bad_file
from .images import ArrayImages, DatasetImages, ImageReadError, ImageSource
from .learn2learn_import import import_learn2learn
from .preprocessing import ImageTransform, standard_augmentation
from .sampling import SPLITS, TaskLoaders, seeded_global_rngs  # noqa: F401  (seeded_global_rngs: moved)
from .tasks import EpisodicTasks, split_support_query

if TYPE_CHECKING:
    from learn2learn.data import MetaDataset

__all__ = [
    "ArrayImages",
    "DatasetImages",
    "DownloadError",
    "EpisodicDataModule",
    "EpisodicTasks",
    "ImageReadError",
    "ImageSource",
    "ImageTransform",
    "cleanup_on_failure",
    "describe_bad_file",
    "split_support_query",
]

# The splits each Lightning stage reads.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",),
                None: SPLITS}


class EpisodicDataModule(TaskLoaders, L.LightningDataModule, abc.ABC):
    """Episodic few-shot classification: meta-batches of N-way K-shot tasks from one ``MetaDataset`` per split.

    Subclasses say where a split's images come from (:meth:`load_split`, returning an
    :class:`ImageSource`) and how they are preprocessed (:meth:`set_image_options` in ``__init__``;
    :meth:`transform` then gives a split's :class:`ImageTransform` the same way in every data module);
    this class checks the split, wraps it in a learn2learn ``MetaDataset`` and serves tasks
    (:class:`EpisodicTasks`). Training tasks are a pure function of ``(seed, global task index)``; each
    epoch meets new ones (``TaskIndexSampler``). Validation and test use the fixed tasks ``0..n-1``
    (``FixedTaskSampler``), identical on every run. Under DDP both samplers give each rank a disjoint
    share of the global indices (see :mod:`datamodules.sampling`). A batch is
    ``(support_x [T, N*K, C, H, W], support_y [T, N*K], query_x [T, N*Q, C, H, W], query_y [T, N*Q])``
    with ``T = meta_batch_size`` and labels ``0..N-1``; images are decoded in the DataLoader's workers.

    Args:
        ways: classes per task (N); also the model's number of outputs (the CLI links them).
        shots: support images per class (K).
        queries: query images per class (Q) of validation and test tasks, and of training tasks unless
            ``train_queries`` is given.
        train_queries: query images per class of training tasks (``None``: ``queries``). Reptile trains
            on all of a task's images, so its paper's "train-shots 10" is ``shots + train_queries = 10``,
            while its test tasks keep the protocol's ``queries``.
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch (steps per epoch = this / meta_batch_size).
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set (600 in the literature's protocol).
        root: folder of the data set.
        download: fetch missing data (in ``prepare_data``, which Lightning runs once per node).
        seed: seed of every task stream.
        num_workers: DataLoader worker processes (they decode the images).

    Example:
        >>> import torch
        >>> class Noise(EpisodicDataModule):  # 10 classes of 4 random 8x8 images
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.set_image_options(image_size=8, channels=1)
        ...     def load_split(self, split):
        ...         images = torch.rand(40, 8, 8).mul(255).byte().numpy()
        ...         return ArrayImages(images, [i // 4 for i in range(40)], {c: str(c) for c in range(10)},
        ...                            transform=self.transform(split))
        >>> dm = Noise(ways=3, shots=1, queries=2, meta_batch_size=2, num_workers=0)
        >>> dm.setup("fit")
        >>> [tuple(t.shape) for t in next(iter(dm.train_dataloader()))]
        [(2, 3, 1, 8, 8), (2, 3), (2, 6, 1, 8, 8), (2, 6)]
    """

    task = "classification"
    #: The data set's name in messages.
    name = "Episodic data"

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        train_queries: int | None = None,
        meta_batch_size: int = 32,
        train_tasks_per_epoch: int = 10_000,
        val_tasks: int = 600,
        test_tasks: int = 600,
        root: str | None = "~/data",
        download: bool = False,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "ways", ways, minimum=2)
        for name in ("shots", "queries", "meta_batch_size", "train_tasks_per_epoch", "val_tasks", "test_tasks"):
            check_int(owner, name, locals()[name])
        check_int(owner, "num_workers", num_workers, minimum=0)
        check_int(owner, "seed", seed, minimum=0)
        if train_queries is not None:
            check_int(owner, "train_queries", train_queries)
        self.save_hyperparameters()
        self.ways, self.shots, self.queries, self.meta_batch_size = ways, shots, queries, meta_batch_size
        self.train_queries = train_queries
        self.train_tasks_per_epoch, self.val_tasks, self.test_tasks = train_tasks_per_epoch, val_tasks, test_tasks
        self.root = None if root is None else Path(os.path.expanduser(root))
        self.download, self.seed, self.num_workers = download, seed, num_workers
        self.sources: dict[str, ImageSource] = {}
        self.datasets: dict[str, MetaDataset] = {}

    # -- for subclasses ---------------------------------------------------------------------------

    @abc.abstractmethod
    def load_split(self, split: str) -> ImageSource:
        """The images of ``split`` (``"train"``, ``"val"`` or ``"test"``), with their transform."""

    def set_image_options(self, image_size: int, channels: int = 3, invert: bool = False,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          augment: bool = False, padding: int | None = None,
                          resample: int = Image.Resampling.BILINEAR) -> None:
        """Check and store the preprocessing options that :meth:`transform` reads (call it in ``__init__``).

        Args:
            image_size: height and width the images are resized to.
            channels: 1 (grey) or 3 (RGB).
            invert: use ``1 - x``.
            mean: per-channel mean to subtract after scaling to [0, 1] (``None``: no normalisation).
            std: per-channel standard deviation to divide by.
            augment: random crop, flip and (RGB) colour jitter on training images.
            padding: zero padding of the random crop (``None``: ``image_size // 8``, at least 1).
            resample: PIL resampling filter of the resize.

        Raises:
            ValueError: an option out of range, naming it and the value given.
        """
        owner = type(self).__name__
        self.image_size = check_int(owner, "image_size", image_size)
        if channels not in (1, 3):
            raise ValueError(f"{owner} `channels` must be 1 or 3; got {channels!r}.")
        self.channels, self.invert, self.augment, self.resample = channels, invert, augment, resample
        self.padding = max(1, image_size // 8) if padding is None else padding
        self.mean, self.std = check_normalisation(owner, channels, mean, std)

    def transform(self, split: str) -> ImageTransform:
        """The preprocessing of ``split``'s images: PIL image -> float tensor ``[channels, image_size, image_size]``.

        Only ``"train"`` is augmented (if ``augment``); ``"val"`` and ``"test"`` give the deterministic
        preprocessing that a trained model expects of new images too (see
        :func:`metasgd_lightning.commands.inference.adapt_to_folder`).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: an unknown split.
            TypeError: the subclass neither called :meth:`set_image_options` nor overrode this.

        Example:
            >>> from datamodules import OmniglotDataModule
            >>> OmniglotDataModule(image_size=28).transform("test")
            ImageTransform(image_size=28, channels=1, invert=True, resample=LANCZOS)
        """
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__}.transform: unknown split {split!r}; expected one of {SPLITS}.")
        if not hasattr(self, "image_size"):
            raise TypeError(f"{type(self).__name__} does not describe its preprocessing: call "
                            "self.set_image_options(...) in __init__, or override transform().")
        augment = None
        if self.augment and split == "train":
            augment = standard_augmentation(self.image_size, self.padding, color=self.channels == 3)
        return ImageTransform(self.image_size, self.channels, self.invert, self.mean, self.std, augment, self.resample)

    # -- Lightning hooks --------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if stage not in STAGE_SPLITS:
            raise ValueError(f"{type(self).__name__}.setup: unknown stage {stage!r}; expected one of "
                             f"{[s for s in STAGE_SPLITS if s]} or None.")
        l2l = import_learn2learn()
        for split in STAGE_SPLITS[stage]:
            if split in self.datasets:
                continue
            source = self.load_split(split)
            self.check_split(split, source)
            # Labels are passed in, so that learn2learn does not decode every image to find them.
            self.datasets[split] = l2l.data.MetaDataset(source, indices_to_labels=dict(enumerate(source.labels)))
            self.sources[split] = source

    def queries_of(self, split: str) -> int:
        """Query images per class in ``split``'s tasks: ``train_queries`` for ``"train"`` if given, else ``queries``.

        Example:
            >>> from datamodules import OmniglotDataModule
            >>> dm = OmniglotDataModule(shots=1, queries=1, train_queries=9)
            >>> dm.queries_of("train"), dm.queries_of("test")
            (9, 1)
        """
        if split == "train" and getattr(self, "train_queries", None) is not None:
            return self.train_queries
        return self.queries

    def check_split(self, split: str, source: ImageSource) -> None:
        """Errors for a split with fewer classes than ``ways`` or a class with fewer than ``shots + queries`` images.

        ``queries`` is the split's own (:meth:`queries_of`): ``train_queries`` for the training split.
        """
        counts = source.class_counts()
        if len(counts) < self.ways:
            raise ValueError(f"{self.name} split '{split}' has {len(counts)} classes, fewer than ways={self.ways}. "
                             f"Lower `ways` or give the split more classes.")
        queries = self.queries_of(split)
        name = "train_queries" if split == "train" and getattr(self, "train_queries", None) is not None else "queries"
        needed = self.shots + queries
        small = [(label, n) for label, n in counts.items() if n < needed]
        if small:
            listed = ", ".join(f"'{source.class_names.get(label, label)}' has {n}" for label, n in small[:5])
            more = f" (and {len(small) - 5} more classes)" if len(small) > 5 else ""
            raise ValueError(f"{self.name} split '{split}': class {listed} images{more}, but every class needs "
                             f"shots + {name} = {self.shots} + {queries} = {needed}. Lower `shots` or "
                             f"`{name}`, or remove the small classes.")

    def tasks(self, split: str, length: int) -> EpisodicTasks:
        """The task set of ``split`` with ``length`` tasks (after :meth:`setup`)."""
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: split '{split}' is not loaded; call setup() first "
                               f"(the Trainer does).")
        return EpisodicTasks(self.datasets[split], split, length, self.ways, self.shots, self.queries_of(split),
                             self.seed, self.task_groups(split))

    def task_groups(self, split: str) -> dict[int, str] | None:
        """The group of each class label of ``split`` if its tasks draw all their classes from one group, else ``None``.

        ``None`` here; :class:`~datamodules.OmniglotDataModule` with ``within_alphabet=True`` groups
        characters by alphabet.
        """
        return None

    # -- helpers for subclasses -------------------------------------------------------------------

    def missing_data(self, expected: str, layout: str, how_to_get: str) -> FileNotFoundError:
        """The error for data that is not there and may not be downloaded."""
        return FileNotFoundError(f"{self.name} data not found: expected {expected}. Layout: {layout}. {how_to_get}")

