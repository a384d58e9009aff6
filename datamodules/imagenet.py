"""mini-ImageNet and tiered-ImageNet: 84x84 few-shot benchmarks cut from ILSVRC-12, read with learn2learn."""

from __future__ import annotations

import pickle
from pathlib import Path

from metasgd_lightning._quiet import import_learn2learn

from .episodic import ArrayImages, DatasetImages, EpisodicDataModule, ImageSource, cleanup_on_failure, describe_bad_file
from .sampling import SPLITS

__all__ = ["MiniImageNetDataModule", "TieredImageNetDataModule"]

# learn2learn's names of the splits.
MODES = {"train": "train", "val": "validation", "test": "test"}
ZENODO = "https://zenodo.org/record/7978538"


def unreadable(path: Path, what: str, error: Exception, deleted: bool) -> RuntimeError:
    """The error for a data file that exists but does not load."""
    action = ("It was deleted, so that the next run downloads it again." if deleted else
              "It is probably a failed or partial download: delete it and run with download=True, or replace it.")
    return RuntimeError(f"{path} cannot be read as {what} ({type(error).__name__}: {error}){describe_bad_file(path)}. "
                        f"{action}")


class MiniImageNetDataModule(EpisodicDataModule):
    """mini-ImageNet few-shot tasks (Vinyals et al. 2016) with the class split of Ravi and Larochelle 2017.

    100 ImageNet classes of 600 84x84 colour images: 64 for training, 16 for validation, 20 for test.
    Read with learn2learn's ``MiniImagenet`` from ``root/mini-imagenet-cache-{train,validation,test}.pkl``
    (each a pickled dict: ``image_data``, a uint8 array ``[n, 84, 84, 3]``, and ``class_dict``, class
    name -> image indices). ``download=True`` fetches them with learn2learn (about 1.2 GB in all); a
    download that fails or gives something that does not unpickle is deleted. Pixels are scaled to [0, 1]
    (MAML feeds raw pixels / 255), then normalised with ``mean``/``std`` if given.

    Args:
        root: folder holding the three pickle files.
        download: fetch missing pickles with learn2learn.
        image_size: height and width (84 as stored; other sizes are resized).
        augment: random crop (padding 8), colour jitter and flip on training images (Lee et al. 2019).
        mean: per-channel mean to subtract (``None``: no normalisation).
        std: per-channel standard deviation to divide by.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class (Q; 15 in MAML and Meta-SGD).
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch.
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set.
        seed: seed of every task stream.
        num_workers: DataLoader worker processes (they decode the images).

    Reference:
        Vinyals et al. (2016). Matching Networks for One Shot Learning. Ravi and Larochelle (2017).
        Optimization as a Model for Few-Shot Learning.

    Example:
        >>> dm = MiniImageNetDataModule(root="~/data", download=True, shots=1, meta_batch_size=4)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> [tuple(t.shape) for t in next(iter(dm.train_dataloader()))]  # doctest: +SKIP
        [(4, 5, 3, 84, 84), (4, 5), (4, 75, 3, 84, 84), (4, 75)]
    """

    name = "mini-ImageNet"

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
        self.set_image_options(image_size, augment=augment, mean=mean, std=std, padding=8)

    def pickle_path(self, split: str) -> Path:
        return self.root / f"mini-imagenet-cache-{MODES[split]}.pkl"

    def prepare_data(self) -> None:
        if self.download:
            for split in SPLITS:
                if not self.pickle_path(split).is_file():
                    self.fetch(split)

    def fetch(self, split: str) -> None:
        """Download one split's pickle with learn2learn (which also checks that it unpickles)."""
        l2l = import_learn2learn()
        path = self.pickle_path(split)
        with cleanup_on_failure(f"Downloading mini-ImageNet ({MODES[split]}) to {path}", [path],
                                f"Run again later, or fetch {path.name} by hand from {ZENODO} into {self.root}."):
            self.root.mkdir(parents=True, exist_ok=True)
            l2l.vision.datasets.MiniImagenet(root=str(self.root), mode=MODES[split], download=True)

    def load_split(self, split: str) -> ImageSource:
        path = self.pickle_path(split)
        if not path.is_file():
            if not self.download:
                raise self.missing_data(
                    str(path), "mini-imagenet-cache-{train,validation,test}.pkl in `root`, each a pickled dict with "
                    "'image_data' (uint8 [n, 84, 84, 3]) and 'class_dict' (class name -> image indices)",
                    f"Set download=True to fetch them with learn2learn (1.2 GB), or get them from {ZENODO}.")
            self.fetch(split)
        l2l = import_learn2learn()
        try:
            data = l2l.vision.datasets.MiniImagenet(root=str(self.root), mode=MODES[split], download=False)
        except Exception as error:
            if self.download:
                path.unlink(missing_ok=True)
            raise unreadable(path, "a mini-ImageNet pickle", error, deleted=self.download) from error
        names = {label: name for name, label in data.class_idx.items()}
        labels = [int(label) for label in data.y]
        # Keep learn2learn's uint8 array, not its float32 copy of every image (4x the memory).
        images = data.data["image_data"]
        del data
        return ArrayImages(images, labels, names, self.transform(split), origin=str(path))


class TieredImageNetDataModule(EpisodicDataModule):
    """tiered-ImageNet few-shot tasks (Ren et al. 2018): 608 classes in 34 categories, split by category.

    351 training, 97 validation and 160 test classes of 84x84 colour images, so that training and test
    classes come from different high-level categories. Read with learn2learn's ``TieredImagenet`` from
    ``root/tiered-imagenet/{train,val,test}_images_png.pkl`` (pickled list of PNG-encoded images) and
    ``{train,val,test}_labels.pkl`` (pickled dict with ``label_specific``, a class index per image, and
    optionally ``label_specific_str``, the class names). ``download=True`` fetches all splits with
    learn2learn (12 GB).

    Args:
        root: folder holding ``tiered-imagenet/``.
        download: fetch the data with learn2learn if missing.
        image_size: height and width (84 as stored).
        augment: random crop (padding 8), colour jitter and flip on training images (Lee et al. 2019).
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
        Ren et al. (2018). Meta-Learning for Semi-Supervised Few-Shot Classification. ICLR.

    Example:
        >>> dm = TieredImageNetDataModule(root="~/data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("test")  # doctest: +SKIP
        >>> [tuple(t.shape) for t in next(iter(dm.test_dataloader()))]  # doctest: +SKIP
        [(4, 5, 3, 84, 84), (4, 5), (4, 75, 3, 84, 84), (4, 75)]
    """

    name = "tiered-ImageNet"

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
        self.set_image_options(image_size, augment=augment, mean=mean, std=std, padding=8)

    @property
    def folder(self) -> Path:
        return self.root / "tiered-imagenet"

    def files(self, split: str) -> tuple[Path, Path]:
        """The images and labels pickles of ``split``."""
        return self.folder / f"{split}_images_png.pkl", self.folder / f"{split}_labels.pkl"

    def _missing(self) -> list[Path]:
        return [path for split in SPLITS for path in self.files(split) if not path.is_file()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            self.fetch()

    def fetch(self) -> None:
        """Download every split with learn2learn."""
        l2l = import_learn2learn()
        extra = [self.folder / "class_names.txt", self.folder / "synsets.txt", self.root / "tiered_imagenet.tar"]
        artifacts = [path for split in SPLITS for path in self.files(split)] + extra + [self.folder]
        with cleanup_on_failure(f"Downloading tiered-ImageNet to {self.folder}", artifacts,
                                f"Run again later, or fetch the tiered-imagenet-* files by hand from {ZENODO}."):
            self.root.mkdir(parents=True, exist_ok=True)
            l2l.vision.datasets.TieredImagenet(root=str(self.root), mode="train", download=True)

    def load_split(self, split: str) -> ImageSource:
        images_path, labels_path = self.files(split)
        if self._missing():
            if not self.download:
                raise self.missing_data(
                    f"{images_path} and {labels_path}", "tiered-imagenet/{train,val,test}_images_png.pkl (pickled "
                    "list of PNG bytes) and {train,val,test}_labels.pkl (pickled dict with 'label_specific') in `root`",
                    f"Set download=True to fetch them with learn2learn (12 GB), or get them from {ZENODO}.")
            self.fetch()
        l2l = import_learn2learn()
        try:
            data = l2l.vision.datasets.TieredImagenet(root=str(self.root), mode=MODES[split], download=False)
            with open(labels_path, "rb") as f:
                names = pickle.load(f, encoding="latin1").get("label_specific_str")
        except Exception as error:
            notes = describe_bad_file(images_path) + describe_bad_file(labels_path)
            raise RuntimeError(f"{images_path} and {labels_path} cannot be read as tiered-ImageNet "
                               f"({type(error).__name__}: {error}){notes}. They are probably a failed or partial "
                               f"download: delete {self.folder} and run with download=True.") from error
        labels = [int(label) for label in data.labels]
        class_names = {label: str(names[label]) if names is not None and label < len(names) else str(label)
                       for label in set(labels)}
        return DatasetImages(data, labels, class_names, self.transform(split), origin=str(images_path))
