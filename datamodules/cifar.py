"""CIFAR-FS and FC100: 32x32 few-shot benchmarks cut from CIFAR-100, read with learn2learn."""

from __future__ import annotations

import shutil
from pathlib import Path

from metasgd_lightning._quiet import import_learn2learn

from .episodic import (
    DatasetImages,
    EpisodicDataModule,
    ImageSource,
    cleanup_on_failure,
)
from .imagenet import MODES, ZENODO, unreadable
from .sampling import SPLITS

__all__ = ["CIFARFSDataModule", "FC100DataModule"]


class CIFARFSDataModule(EpisodicDataModule):
    """CIFAR-FS few-shot tasks (Bertinetto et al. 2019): CIFAR-100's classes split 64/16/20 at random.

    600 32x32 colour images per class. Read with learn2learn's ``CIFARFS``, which expects the raw data in
    ``root/cifarfs/cifar100/data/<class>/*.png`` with the class lists
    ``root/cifarfs/cifar100/splits/bertinetto/{train,val,test}.txt``, and copies each split's classes to
    ``root/cifarfs/processed/{train,val,test}/`` on first use. An interrupted copy is detected (file
    counts differ from the raw data) and redone. ``download=True`` fetches the raw data with learn2learn
    (160 MB).

    Args:
        root: folder holding ``cifarfs/``.
        download: fetch the data with learn2learn if missing.
        image_size: height and width (32 as stored).
        augment: random crop (padding 4), colour jitter and flip on training images (Lee et al. 2019).
        mean: per-channel mean to subtract (``None``: no normalisation).
        std: per-channel standard deviation to divide by.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch.
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set.
        seed: seed of every task stream.
        num_workers: DataLoader worker processes (they decode the images).

    Reference:
        Bertinetto, Henriques, Torr and Vedaldi (2019). Meta-learning with differentiable closed-form
        solvers. ICLR.

    Example:
        >>> dm = CIFARFSDataModule(root="~/data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> [tuple(t.shape) for t in next(iter(dm.train_dataloader()))]  # doctest: +SKIP
        [(4, 5, 3, 32, 32), (4, 5), (4, 75, 3, 32, 32), (4, 75)]
    """

    name = "CIFAR-FS"

    def __init__(
        self,
        root: str = "~/data",
        download: bool = False,
        image_size: int = 32,
        augment: bool = False,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch_size: int = 4,
        train_tasks_per_epoch: int = 10_000,
        val_tasks: int = 600,
        test_tasks: int = 600,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, meta_batch_size=meta_batch_size,
                         train_tasks_per_epoch=train_tasks_per_epoch, val_tasks=val_tasks, test_tasks=test_tasks,
                         root=root, download=download, seed=seed, num_workers=num_workers)
        self.set_image_options(image_size, augment=augment, mean=mean, std=std, padding=4)

    @property
    def raw(self) -> Path:
        return self.root / "cifarfs" / "cifar100"

    @property
    def processed(self) -> Path:
        return self.root / "cifarfs" / "processed"

    def split_file(self, split: str) -> Path:
        return self.raw / "splits" / "bertinetto" / f"{split}.txt"

    def _raw_present(self) -> bool:
        return (self.raw / "data").is_dir() and all(self.split_file(split).is_file() for split in SPLITS)

    def _processed_complete(self) -> bool:
        """Whether learn2learn's copy of each split is all there (an interrupted copy would be trusted)."""
        if not all((self.processed / split).is_dir() for split in SPLITS):
            return False
        if not self._raw_present():
            return True  # nothing to compare with: trust it
        for split in SPLITS:
            for name in self.split_file(split).read_text().split():
                copy, source = self.processed / split / name, self.raw / "data" / name
                if not copy.is_dir() or len(list(copy.iterdir())) != len(list(source.iterdir())):
                    return False
        return True

    def prepare_data(self) -> None:
        if not self._processed_complete():
            if self._raw_present():
                self.process()
            elif self.download:
                self.fetch()

    def process(self) -> None:
        """Let learn2learn copy each split's classes to ``processed/`` (after removing a partial copy)."""
        l2l = import_learn2learn()
        shutil.rmtree(self.processed, ignore_errors=True)
        with cleanup_on_failure(f"Preparing CIFAR-FS in {self.processed}", [self.processed],
                                f"Check {self.raw}."):
            l2l.vision.datasets.CIFARFS(root=str(self.root), mode="train", download=False)

    def fetch(self) -> None:
        """Download and prepare the data with learn2learn."""
        l2l = import_learn2learn()
        folder = self.root / "cifarfs"
        with cleanup_on_failure(f"Downloading CIFAR-FS to {folder}", [self.root / "cifarfs.zip", folder],
                                f"Run again later, or fetch cifar100.zip by hand from {ZENODO} and unzip it "
                                f"into {folder}."):
            self.root.mkdir(parents=True, exist_ok=True)
            l2l.vision.datasets.CIFARFS(root=str(self.root), mode="train", download=True)

    def load_split(self, split: str) -> ImageSource:
        if not self._processed_complete():
            if not self._raw_present() and not self.download:
                raise self.missing_data(
                    f"{self.raw}/data/ and {self.raw}/splits/bertinetto/",
                    "cifarfs/cifar100/data/<class>/*.png and cifarfs/cifar100/splits/bertinetto/{train,val,test}.txt "
                    "(one class name per line) in `root`",
                    f"Set download=True to fetch them with learn2learn (160 MB), or get cifar100.zip from {ZENODO}.")
            self.prepare_data()
        l2l = import_learn2learn()
        data = l2l.vision.datasets.CIFARFS(root=str(self.root), mode=MODES[split], download=False)
        class_names = dict(enumerate(data.classes))
        return DatasetImages(data, data.targets, class_names, self.transform(split),
                             paths=[path for path, _ in data.samples])


class FC100DataModule(EpisodicDataModule):
    """FC100 few-shot tasks (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60/20/20 classes.

    Training, validation and test classes come from different CIFAR-100 superclasses (12/4/4), which makes
    FC100 harder than CIFAR-FS. Read with learn2learn's ``FC100`` from
    ``root/FC100_{train,val,test}.pickle`` (each a pickled dict: ``data``, a uint8 array
    ``[n, 32, 32, 3]``, and ``labels``, a class index per image). ``download=True`` fetches them with
    learn2learn (160 MB); a download that fails is deleted.

    Args:
        root: folder holding the three pickle files.
        download: fetch the data with learn2learn if missing.
        image_size: height and width (32 as stored).
        augment: random crop (padding 4), colour jitter and flip on training images (Lee et al. 2019).
        mean: per-channel mean to subtract (``None``: no normalisation).
        std: per-channel standard deviation to divide by.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch.
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set.
        seed: seed of every task stream.
        num_workers: DataLoader worker processes (they decode the images).

    Reference:
        Oreshkin, Rodriguez and Lacoste (2018). TADAM: Task dependent adaptive metric for improved
        few-shot learning. NeurIPS.

    Example:
        >>> dm = FC100DataModule(root="~/data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("test")  # doctest: +SKIP
        >>> [tuple(t.shape) for t in next(iter(dm.test_dataloader()))]  # doctest: +SKIP
        [(4, 5, 3, 32, 32), (4, 5), (4, 75, 3, 32, 32), (4, 75)]
    """

    name = "FC100"

    def __init__(
        self,
        root: str = "~/data",
        download: bool = False,
        image_size: int = 32,
        augment: bool = False,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch_size: int = 4,
        train_tasks_per_epoch: int = 10_000,
        val_tasks: int = 600,
        test_tasks: int = 600,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, meta_batch_size=meta_batch_size,
                         train_tasks_per_epoch=train_tasks_per_epoch, val_tasks=val_tasks, test_tasks=test_tasks,
                         root=root, download=download, seed=seed, num_workers=num_workers)
        self.set_image_options(image_size, augment=augment, mean=mean, std=std, padding=4)

    def pickle_path(self, split: str) -> Path:
        return self.root / f"FC100_{split}.pickle"

    def _missing(self) -> list[Path]:
        return [self.pickle_path(split) for split in SPLITS if not self.pickle_path(split).is_file()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            self.fetch()

    def fetch(self) -> None:
        """Download and unzip the pickles with learn2learn."""
        l2l = import_learn2learn()
        artifacts = [self.root / "fc100.zip"] + [self.pickle_path(split) for split in SPLITS]
        with cleanup_on_failure(f"Downloading FC100 to {self.root}", artifacts,
                                f"Run again later, or fetch fc100.zip by hand from {ZENODO} and unzip it into "
                                f"{self.root}."):
            self.root.mkdir(parents=True, exist_ok=True)
            l2l.vision.datasets.FC100(root=str(self.root), mode="train", download=True)

    def load_split(self, split: str) -> ImageSource:
        path = self.pickle_path(split)
        if self._missing():
            if not self.download:
                raise self.missing_data(
                    str(path), "FC100_{train,val,test}.pickle in `root`, each a pickled dict with 'data' "
                    "(uint8 [n, 32, 32, 3]) and 'labels' (a class index per image)",
                    f"Set download=True to fetch them with learn2learn (160 MB), or get fc100.zip from {ZENODO}.")
            self.fetch()
        l2l = import_learn2learn()
        try:
            data = l2l.vision.datasets.FC100(root=str(self.root), mode=MODES[split], download=False)
        except Exception as error:
            if self.download:
                path.unlink(missing_ok=True)
            raise unreadable(path, "an FC100 pickle", error, deleted=self.download) from error
        labels = [int(label) for label in data.labels]
        class_names = {label: f"CIFAR-100 class {label}" for label in set(labels)}
        return DatasetImages(data, labels, class_names, self.transform(split), origin=str(path))
