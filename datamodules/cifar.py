"""CIFAR-FS and FC100: 32x32 few-shot benchmarks cut from CIFAR-100, read with learn2learn."""

from __future__ import annotations

import shutil
from pathlib import Path

from .downloads import cleanup_on_failure
from .images import DatasetImages, ImageSource
from .learn2learn_benchmark import MODES, ZENODO, Learn2LearnBenchmark
from .learn2learn_import import import_learn2learn
from .sampling import SPLITS

__all__ = ["CIFAR100Benchmark", "CIFARFSDataModule", "FC100DataModule"]


class CIFAR100Benchmark(Learn2LearnBenchmark):
    """The base of the sets cut from CIFAR-100: 32x32 images (crop padding 4), a 160 MB download."""

    download_size = "160 MB"
    crop_padding = 4

    def __init__(self, root: str = "~/data", download: bool = False, image_size: int = 32, **kwargs) -> None:
        super().__init__(root=root, download=download, image_size=image_size, **kwargs)


class CIFARFSDataModule(CIFAR100Benchmark):
    """CIFAR-FS few-shot tasks (Bertinetto et al. 2019): CIFAR-100's classes split 64/16/20 at random.

    600 32x32 colour images per class. Read with learn2learn's ``CIFARFS``, which expects the raw data in
    ``root/cifarfs/cifar100/data/<class>/*.png`` with the class lists
    ``root/cifarfs/cifar100/splits/bertinetto/{train,val,test}.txt``, and copies each split's classes to
    ``root/cifarfs/processed/{train,val,test}/`` on first use. An interrupted copy is detected (file
    counts differ from the raw data) and redone. ``download=True`` fetches the raw data with learn2learn
    (160 MB). The arguments are those of :class:`~datamodules.learn2learn_benchmark.Learn2LearnBenchmark`
    (``image_size`` 32 as stored, ``augment`` crops with padding 4).

    Reference:
        Bertinetto, Henriques, Torr and Vedaldi (2019). Meta-learning with differentiable closed-form
        solvers. ICLR.
    """

    name = "CIFAR-FS"
    layout = ("cifarfs/cifar100/data/<class>/*.png and cifarfs/cifar100/splits/bertinetto/{train,val,test}.txt "
              "(one class name per line) in `root`")

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

    def files(self, split: str) -> list[Path]:
        return [self.processed / split]

    def missing(self, split: str) -> list[Path]:
        # The processed copy is made here from the raw data: only the raw data is downloaded.
        if self._processed_complete() or self._raw_present():
            return []
        return [self.raw / "data", self.split_file(split)]

    def prepare_data(self) -> None:
        super().prepare_data()
        if not self._processed_complete() and self._raw_present():
            self.process()

    def process(self) -> None:
        """Let learn2learn copy each split's classes to ``processed/`` (after removing a partial copy)."""
        l2l = import_learn2learn()
        shutil.rmtree(self.processed, ignore_errors=True)
        with cleanup_on_failure(f"Preparing CIFAR-FS in {self.processed}", [self.processed],
                                f"Check {self.raw}."):
            l2l.vision.datasets.CIFARFS(root=str(self.root), mode="train", download=False)

    def fetch(self, split: str) -> None:
        """Download and prepare the data with learn2learn."""
        l2l = import_learn2learn()
        folder = self.root / "cifarfs"
        with cleanup_on_failure(f"Downloading CIFAR-FS to {folder}", [self.root / "cifarfs.zip", folder],
                                f"Run again later, or fetch cifar100.zip by hand from {ZENODO} and unzip it "
                                f"into {folder}."):
            self.root.mkdir(parents=True, exist_ok=True)
            l2l.vision.datasets.CIFARFS(root=str(self.root), mode="train", download=True)

    def open_split(self, split: str) -> ImageSource:
        if not self._processed_complete():
            self.process()
        l2l = import_learn2learn()
        data = l2l.vision.datasets.CIFARFS(root=str(self.root), mode=MODES[split], download=False)
        class_names = dict(enumerate(data.classes))
        return DatasetImages(data, data.targets, class_names, self.transform(split),
                             paths=[path for path, _ in data.samples])


class FC100DataModule(CIFAR100Benchmark):
    """FC100 few-shot tasks (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60/20/20 classes.

    Training, validation and test classes come from different CIFAR-100 superclasses (12/4/4), which makes
    FC100 harder than CIFAR-FS. Read with learn2learn's ``FC100`` from
    ``root/FC100_{train,val,test}.pickle`` (each a pickled dict: ``data``, a uint8 array
    ``[n, 32, 32, 3]``, and ``labels``, a class index per image). ``download=True`` fetches them with
    learn2learn (160 MB); a download that fails is deleted. The arguments are those of
    :class:`~datamodules.learn2learn_benchmark.Learn2LearnBenchmark` (``image_size`` 32 as stored,
    ``augment`` crops with padding 4).

    Reference:
        Oreshkin, Rodriguez and Lacoste (2018). TADAM: Task dependent adaptive metric for improved
        few-shot learning. NeurIPS.
    """

    name = "FC100"
    layout = ("FC100_{train,val,test}.pickle in `root`, each a pickled dict with 'data' (uint8 [n, 32, 32, 3]) "
              "and 'labels' (a class index per image)")

    def files(self, split: str) -> list[Path]:
        return [self.root / f"FC100_{split}.pickle"]

    def fetch(self, split: str) -> None:
        """Download and unzip the pickles with learn2learn."""
        l2l = import_learn2learn()
        artifacts = [self.root / "fc100.zip"] + [path for s in SPLITS for path in self.files(s)]
        with cleanup_on_failure(f"Downloading FC100 to {self.root}", artifacts,
                                f"Run again later, or fetch fc100.zip by hand from {ZENODO} and unzip it into "
                                f"{self.root}."):
            self.root.mkdir(parents=True, exist_ok=True)
            l2l.vision.datasets.FC100(root=str(self.root), mode="train", download=True)

    def open_split(self, split: str) -> ImageSource:
        l2l = import_learn2learn()
        data = l2l.vision.datasets.FC100(root=str(self.root), mode=MODES[split], download=False)
        labels = [int(label) for label in data.labels]
        class_names = {label: f"CIFAR-100 class {label}" for label in set(labels)}
        return DatasetImages(data, labels, class_names, self.transform(split), origin=str(self.files(split)[0]))
