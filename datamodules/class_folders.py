"""Classes stored as folders of image files: find them, and split them into train/val/test."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .episodic import EpisodicDataModule

__all__ = ["IMAGE_EXTENSIONS", "find_class_folders", "read_class_folders", "split_classes", "visible"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def visible(name: str) -> bool:
    """Not a hidden file or folder (``.name``) and not macOS's ``__MACOSX`` folder of zip archives."""
    return not name.startswith(".") and name != "__MACOSX"


def find_class_folders(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, list[Path]]:
    """Every folder under ``root`` that directly holds images is a class, named by its path relative to ``root``.

    So ``root/cat/*.jpg`` gives the class ``cat`` and ``root/Greek/character01/*.png`` the class
    ``Greek/character01``. Hidden files and folders (and macOS's ``__MACOSX``) are skipped. Classes and
    their images are sorted by name, so the result does not depend on the file system's order.
    """
    classes: dict[str, list[Path]] = {}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if visible(d))
        images = sorted(f for f in files if f.lower().endswith(tuple(extensions)) and visible(f))
        if images:
            name = Path(folder).relative_to(root).as_posix()
            classes[name] = [Path(folder) / f for f in images]
    return dict(sorted(classes.items()))


def split_classes(names: Sequence, fractions: Sequence[float], seed: int) -> dict[str, list]:
    """Shuffle the class names with ``seed`` and cut them into train/val/test by ``fractions``.

    Split sizes are ``round(n * f_train)``, ``round(n * (f_train + f_val)) - round(n * f_train)`` and the rest.
    """
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n = len(order)
    first, second = round(n * fractions[0]), round(n * (fractions[0] + fractions[1]))
    return {"train": order[:first], "val": order[first:second], "test": order[second:]}


def read_class_folders(module: EpisodicDataModule, root: Path | None, split_dirs: Mapping[str, Path | None],
                       fractions: Sequence[float], split_seed: int) -> dict[str, dict[str, list[Path]] | None]:
    """The classes of each split: ``root`` split by ``fractions``, or one folder per split (``None``: none given).

    ``module`` words the error for a folder that is not there (:meth:`EpisodicDataModule.missing_data`).
    """
    layout = "one folder per class holding its images, e.g. <root>/<class>/*.png or <root>/<group>/<class>/*.png"
    if root is not None:
        if not root.is_dir():
            raise module.missing_data(f"the folder {root}", layout, "Check `root`.")
        classes = find_class_folders(root)
        if not classes:
            raise module.missing_data(f"class folders with images under {root}", layout,
                                      f"{root} holds no image files in any folder.")
        names = split_classes(list(classes), fractions, split_seed)
        return {split: {name: classes[name] for name in names[split]} for split in names}
    result: dict[str, dict[str, list[Path]] | None] = {}
    for split, folder in split_dirs.items():
        if folder is None:
            result[split] = None
            continue
        if not folder.is_dir():
            raise module.missing_data(f"the {split} folder {folder}", layout, f"Check `{split}_dir`.")
        result[split] = find_class_folders(folder)
    return result
