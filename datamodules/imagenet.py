"""mini-ImageNet and tiered-ImageNet: 84x84 few-shot benchmarks cut from ILSVRC-12, read with learn2learn."""

from __future__ import annotations

import pickle
from pathlib import Path

from .downloads import cleanup_on_failure
from .images import ArrayImages, DatasetImages, ImageSource
from .learn2learn_benchmark import MODES, ZENODO, Learn2LearnBenchmark
from .learn2learn_import import import_learn2learn
from .sampling import SPLITS

__all__ = ["MiniImageNetDataModule", "TieredImageNetDataModule"]


class MiniImageNetDataModule(Learn2LearnBenchmark):
    """mini-ImageNet few-shot tasks (Vinyals et al. 2016) with the class split of Ravi and Larochelle 2017.

    100 ImageNet classes of 600 84x84 colour images: 64 for training, 16 for validation, 20 for test.
    Read with learn2learn's ``MiniImagenet`` from ``root/mini-imagenet-cache-{train,validation,test}.pkl``
    (each a pickled dict: ``image_data``, a uint8 array ``[n, 84, 84, 3]``, and ``class_dict``, class
    name -> image indices). ``download=True`` fetches them with learn2learn (about 1.2 GB in all); a
    download that fails or gives something that does not unpickle is deleted. The arguments are those
    of :class:`~datamodules.learn2learn_benchmark.Learn2LearnBenchmark` (``image_size`` 84 as stored,
    ``augment`` crops with padding 8).

    Reference:
        Vinyals et al. (2016). Matching Networks for One Shot Learning. Ravi and Larochelle (2017).
        Optimization as a Model for Few-Shot Learning.
    """

    name = "mini-ImageNet"
    layout = ("mini-imagenet-cache-{train,validation,test}.pkl in `root`, each a pickled dict with 'image_data' "
              "(uint8 [n, 84, 84, 3]) and 'class_dict' (class name -> image indices)")
    download_size = "1.2 GB"
    crop_padding = 8
    fetches_all_splits = False  # one pickle per split

    def files(self, split: str) -> list[Path]:
        return [self.root / f"mini-imagenet-cache-{MODES[split]}.pkl"]

    def fetch(self, split: str) -> None:
        """Download one split's pickle with learn2learn (which also checks that it unpickles)."""
        l2l = import_learn2learn()
        [path] = self.files(split)
        with cleanup_on_failure(f"Downloading mini-ImageNet ({MODES[split]}) to {path}", [path],
                                f"Run again later, or fetch {path.name} by hand from {ZENODO} into {self.root}."):
            self.root.mkdir(parents=True, exist_ok=True)
            l2l.vision.datasets.MiniImagenet(root=str(self.root), mode=MODES[split], download=True)

    def open_split(self, split: str) -> ImageSource:
        l2l = import_learn2learn()
        data = l2l.vision.datasets.MiniImagenet(root=str(self.root), mode=MODES[split], download=False)
        names = {label: name for name, label in data.class_idx.items()}
        labels = [int(label) for label in data.y]
        # Keep learn2learn's uint8 array, not its float32 copy of every image (4x the memory).
        images = data.data["image_data"]
        del data
        return ArrayImages(images, labels, names, self.transform(split), origin=str(self.files(split)[0]))


class TieredImageNetDataModule(Learn2LearnBenchmark):
    """tiered-ImageNet few-shot tasks (Ren et al. 2018): 608 classes in 34 categories, split by category.

    351 training, 97 validation and 160 test classes of 84x84 colour images, so that training and test
    classes come from different high-level categories. Read with learn2learn's ``TieredImagenet`` from
    ``root/tiered-imagenet/{train,val,test}_images_png.pkl`` (pickled list of PNG-encoded images) and
    ``{train,val,test}_labels.pkl`` (pickled dict with ``label_specific``, a class index per image, and
    optionally ``label_specific_str``, the class names). ``download=True`` fetches all splits with
    learn2learn (12 GB). The arguments are those of
    :class:`~datamodules.learn2learn_benchmark.Learn2LearnBenchmark` (``image_size`` 84 as stored,
    ``augment`` crops with padding 8).

    Reference:
        Ren et al. (2018). Meta-Learning for Semi-Supervised Few-Shot Classification. ICLR.
    """

    name = "tiered-ImageNet"
    layout = ("tiered-imagenet/{train,val,test}_images_png.pkl (pickled list of PNG bytes) and "
              "{train,val,test}_labels.pkl (pickled dict with 'label_specific') in `root`")
    download_size = "12 GB"
    crop_padding = 8

    @property
    def folder(self) -> Path:
        return self.root / "tiered-imagenet"

    def files(self, split: str) -> list[Path]:
        """The images and labels pickles of ``split``."""
        return [self.folder / f"{split}_images_png.pkl", self.folder / f"{split}_labels.pkl"]

    def fetch(self, split: str) -> None:
        """Download every split with learn2learn."""
        l2l = import_learn2learn()
        extra = [self.folder / "class_names.txt", self.folder / "synsets.txt", self.root / "tiered_imagenet.tar"]
        artifacts = [path for s in SPLITS for path in self.files(s)] + extra + [self.folder]
        with cleanup_on_failure(f"Downloading tiered-ImageNet to {self.folder}", artifacts,
                                f"Run again later, or fetch the tiered-imagenet-* files by hand from {ZENODO}."):
            self.root.mkdir(parents=True, exist_ok=True)
            l2l.vision.datasets.TieredImagenet(root=str(self.root), mode="train", download=True)

    def open_split(self, split: str) -> ImageSource:
        l2l = import_learn2learn()
        images_path, labels_path = self.files(split)
        data = l2l.vision.datasets.TieredImagenet(root=str(self.root), mode=MODES[split], download=False)
        with open(labels_path, "rb") as f:
            names = pickle.load(f, encoding="latin1").get("label_specific_str")
        labels = [int(label) for label in data.labels]
        class_names = {label: str(names[label]) if names is not None and label < len(names) else str(label)
                       for label in set(labels)}
        return DatasetImages(data, labels, class_names, self.transform(split), origin=str(images_path))
