"""The base of the benchmark sets that learn2learn downloads and reads: mini- and tiered-ImageNet, CIFAR-FS, FC100.

Each of them reads a split in the same four steps (:meth:`Learn2LearnBenchmark.load_split`): find
what is missing; fetch it with learn2learn if ``download``, else stop with an error that names the
files, their layout and where to get them; open the split with learn2learn; and if that fails, say
which files do not load (deleting them if ``download``, so that the next run fetches them again). A
subclass says only which files a split needs and how to fetch and open them.
"""

from __future__ import annotations

import abc
from pathlib import Path

from .downloads import remove, unreadable
from .episodic import EpisodicDataModule
from .images import ImageSource
from .sampling import SPLITS

__all__ = ["Learn2LearnBenchmark", "MODES", "ZENODO"]

#: learn2learn's names of the splits.
MODES = {"train": "train", "val": "validation", "test": "test"}
#: Where learn2learn's benchmark files are kept (for fetching them by hand).
ZENODO = "https://zenodo.org/record/7978538"


class Learn2LearnBenchmark(EpisodicDataModule, abc.ABC):
    """Few-shot tasks from a benchmark set that learn2learn downloads and reads (colour images).

    Images are scaled to [0, 1] (MAML feeds raw pixels / 255), then normalised with ``mean``/``std``
    if given; ``augment`` adds the random crop, colour jitter and flip of Lee et al. 2019 to training
    images. A subclass gives the set's :attr:`name`, :attr:`layout`, :attr:`download_size` and
    :attr:`crop_padding`, and implements :meth:`files`, :meth:`fetch` and :meth:`open_split`.

    Args:
        root: the data folder (see each set for its layout).
        download: fetch missing data with learn2learn (in ``prepare_data``, or when a split is loaded).
        image_size: height and width (the stored size by default; other sizes are resized).
        augment: random crop (zero padding 8 for the ImageNet sets, 4 for the CIFAR ones), colour jitter
            and flip on training images (Lee et al. 2019).
        mean: per-channel mean to subtract (``None``: no normalisation).
        std: per-channel standard deviation to divide by.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class (Q; 15 in MAML and Meta-SGD).
        train_queries: query images per class of training tasks (``None``: ``queries``; see
            :class:`~datamodules.episodic.EpisodicDataModule`).
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch.
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set.
        seed: seed of every task stream.
        num_workers: DataLoader worker processes (they decode the images).

    Example:
        >>> from datamodules import MiniImageNetDataModule
        >>> dm = MiniImageNetDataModule(root="~/data", download=True, shots=1, meta_batch_size=4)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> [tuple(t.shape) for t in next(iter(dm.train_dataloader()))]  # doctest: +SKIP
        [(4, 5, 3, 84, 84), (4, 5), (4, 75, 3, 84, 84), (4, 75)]
    """

    #: The files the set needs, for the error when they are missing.
    layout: str
    #: The size of learn2learn's download, for messages.
    download_size: str
    #: Zero padding of the random crop of ``augment`` (Lee et al. 2019: 8 at 84x84, 4 at 32x32).
    crop_padding: int
    #: Whether learn2learn downloads every split at once (then one missing file means fetching them all).
    fetches_all_splits = True

    def __init__(
        self,
        root: str = "~/data",
        download: bool = False,
        image_size: int = 84,
        augment: bool = False,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        train_queries: int | None = None,
        meta_batch_size: int = 4,
        train_tasks_per_epoch: int = 10_000,
        val_tasks: int = 600,
        test_tasks: int = 600,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, train_queries=train_queries,
                         meta_batch_size=meta_batch_size,
                         train_tasks_per_epoch=train_tasks_per_epoch, val_tasks=val_tasks, test_tasks=test_tasks,
                         root=root, download=download, seed=seed, num_workers=num_workers)
        self.set_image_options(image_size, augment=augment, mean=mean, std=std, padding=self.crop_padding)

    # -- for subclasses ---------------------------------------------------------------------------

    @abc.abstractmethod
    def files(self, split: str) -> list[Path]:
        """The files (or folders) that ``split`` is read from."""

    def missing(self, split: str) -> list[Path]:
        """What is not there and a download gives: the absent :meth:`files` of ``split`` (or of every split)."""
        splits = SPLITS if self.fetches_all_splits else (split,)
        return [path for s in splits for path in self.files(s) if not path.exists()]

    @abc.abstractmethod
    def fetch(self, split: str) -> None:
        """Download what ``split`` needs with learn2learn, deleting what a failed download leaves behind."""

    @abc.abstractmethod
    def open_split(self, split: str) -> ImageSource:
        """Read ``split`` with learn2learn; any error means that its files do not load."""

    # -- shared -----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.download:
            for split in SPLITS:
                if self.missing(split):
                    self.fetch(split)

    def load_split(self, split: str) -> ImageSource:
        """Missing -> fetch (if ``download``) -> open -> on failure, say which files do not load.

        Raises:
            FileNotFoundError: data missing and ``download=False``, naming the files, layout and source.
            DownloadError: a download failed (what it left behind is deleted).
            RuntimeError: the files are there but do not load; with ``download`` they are deleted.
        """
        missing = self.missing(split)
        if missing:
            if not self.download:
                raise self.missing_data(
                    " and ".join(map(str, missing)), self.layout,
                    f"Set download=True to fetch them with learn2learn ({self.download_size}), or get them "
                    f"from {ZENODO}.")
            self.fetch(split)
        try:
            return self.open_split(split)
        except Exception as error:
            files = self.files(split)
            failure = unreadable(files, f"{self.name} data", error, deleted=self.download)
            if self.download:
                for path in files:
                    remove(path)
            raise failure from error
