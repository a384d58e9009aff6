"""Few-shot tasks from your own images: one folder per class, at any depth."""

from __future__ import annotations

import os
from pathlib import Path

from .checks import check_fractions
from .class_folders import IMAGE_EXTENSIONS, find_class_folders, read_class_folders, split_classes, visible
from .episodic import EpisodicDataModule
from .images import FileImages, ImageSource, file_images

# FileImages, file_images, IMAGE_EXTENSIONS, find_class_folders, split_classes and visible lived here before
# the package was split by job (now datamodules.images and datamodules.class_folders): still importable.
__all__ = ["FileImages", "IMAGE_EXTENSIONS", "ImageFolderDataModule", "file_images", "find_class_folders",
           "read_class_folders", "split_classes", "visible"]


class ImageFolderDataModule(EpisodicDataModule):
    """Few-shot tasks from your own images, one folder per class.

    A class is any folder that directly holds images (png, jpg, bmp, gif, tif, webp, ppm, pgm), at any
    depth: ``root/cat/*.jpg``, or ``root/<Alphabet>/<character>/*.png`` (class ``Alphabet/character``).
    Either one ``root`` whose classes are split into train/val/test by ``fractions`` (shuffled with
    ``split_seed``; the split is the same on every run), or separate ``train_dir``, ``val_dir`` and
    ``test_dir`` folders (only those of the stages you run are needed). Every image is resized to
    ``image_size`` x ``image_size`` (aspect ratio not kept), converted to ``channels``, scaled to [0, 1],
    optionally inverted, and normalised with ``mean``/``std`` if given.

    Args:
        root: folder of class folders to split by ``fractions``.
        train_dir: folder of the training classes (instead of ``root``).
        val_dir: folder of the validation classes.
        test_dir: folder of the test classes.
        fractions: (train, val, test) shares of the classes of ``root``; they must sum to 1.
        split_seed: seed of the class split of ``root``.
        image_size: height and width the images are resized to.
        channels: 1 (grey) or 3 (RGB).
        mean: per-channel mean to subtract after scaling to [0, 1] (``None``: no normalisation).
        std: per-channel standard deviation to divide by.
        invert: use ``1 - x`` (for dark drawings on white, like Omniglot).
        augment: random crop (padding ``image_size // 8``), flip and (RGB) colour jitter on training images.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        train_queries: query images per class of training tasks (``None``: ``queries``; see
            :class:`~datamodules.episodic.EpisodicDataModule`).
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch.
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set.
        seed: seed of every task stream.
        num_workers: DataLoader worker processes (they decode the images).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for c in range(10):
        ...     (root / f"class{c}").mkdir()
        ...     for i in range(3):
        ...         Image.new("RGB", (12, 12), (25 * c, 8 * i, 0)).save(root / f"class{c}" / f"{i}.png")
        >>> dm = ImageFolderDataModule(root=str(root), image_size=8, fractions=(0.6, 0.2, 0.2), ways=2,
        ...                            shots=1, queries=2, meta_batch_size=4, num_workers=0)
        >>> dm.setup("fit")
        >>> [tuple(t.shape) for t in next(iter(dm.val_dataloader()))]
        [(4, 2, 3, 8, 8), (4, 2), (4, 4, 3, 8, 8), (4, 4)]
    """

    name = "ImageFolder"

    def __init__(
        self,
        root: str | None = None,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_seed: int = 0,
        image_size: int = 84,
        channels: int = 3,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        invert: bool = False,
        augment: bool = False,
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
                         root=root, download=False, seed=seed, num_workers=num_workers)
        owner = type(self).__name__
        dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        if (root is None) == all(d is None for d in dirs.values()):
            raise ValueError(f"{owner} needs either `root` (split by `fractions`) or `train_dir`/`val_dir`/`test_dir`; "
                             f"got root={root!r}, train_dir={train_dir!r}, val_dir={val_dir!r}, test_dir={test_dir!r}.")
        self.set_image_options(image_size, channels, invert, mean=mean, std=std, augment=augment)
        self.split_dirs = {split: None if d is None else Path(os.path.expanduser(d)) for split, d in dirs.items()}
        self.fractions = check_fractions(owner, fractions)
        self.split_seed = split_seed
        self._classes: dict[str, dict[str, list[Path]] | None] | None = None

    def split_class_folders(self) -> dict[str, dict[str, list[Path]] | None]:
        """Class name -> image files, per split."""
        if self._classes is None:
            self._classes = read_class_folders(self, self.root, self.split_dirs, self.fractions, self.split_seed)
        return self._classes

    def load_split(self, split: str) -> ImageSource:
        classes = self.split_class_folders()[split]
        if classes is None:
            raise ValueError(f"{type(self).__name__} needs the {split} split here, but `{split}_dir` is not set; "
                             f"set it (or use `root` with `fractions`).")
        return file_images(classes, self.transform(split))
