"""Image sources: the labelled images of one split, decoded only when an item is read.

An :class:`ImageSource` knows every image's label without decoding it (so that learn2learn can index
the classes cheaply) and decodes an image when the item is read, that is in a DataLoader worker. The
kinds differ in where an image is stored: files (:class:`FileImages`), one array
(:class:`ArrayImages`), or another map-style data set (:class:`DatasetImages`, learn2learn's).
"""

from __future__ import annotations

import abc
import copy
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ArrayImages", "DatasetImages", "FileImages", "ImageReadError", "ImageSource", "file_images"]


class ImageReadError(RuntimeError):
    """An image file (or record) that cannot be decoded."""


class ImageSource(Dataset, abc.ABC):
    """The labelled images of one split, whose labels are known without decoding any image.

    Item ``i`` is ``(image tensor, label)``; the image is decoded when the item is read (in a DataLoader
    worker). Subclasses say how to read one stored image (:meth:`read`) and how to name it in error
    messages (:meth:`describe`).

    Args:
        keys: one key per image for :meth:`read` (a path, or an index into stored records).
        labels: one integer class label per image.
        class_names: a readable name per label, for messages.
        transform: PIL image -> tensor.
    """

    def __init__(self, keys: Sequence[Any], labels: Sequence[int], class_names: Mapping[int, str],
                 transform: Callable[[Image.Image], Tensor] | None = None) -> None:
        if len(keys) != len(labels):
            raise ValueError(f"ImageSource needs one label per image; got {len(keys)} images, {len(labels)} labels.")
        self.keys, self.labels = list(keys), [int(label) for label in labels]
        self.class_names = dict(class_names)
        self.turns: list[int] | None = None  # quarter turns per item (rotated classes)
        # The group of each class (e.g. the alphabet of an Omniglot character), for tasks drawn within one group.
        self.class_groups: dict[int, str] | None = None
        self.transform = transform

    @abc.abstractmethod
    def read(self, key: Any) -> Image.Image:
        """The stored image ``key``, undecoded beyond PIL's opening."""

    def describe(self, key: Any) -> str:
        return str(key)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        key = self.keys[index]
        try:
            image = self.read(key)
            image.load()  # PIL decodes lazily: decode here, so that a broken file is named
        except Exception as error:
            raise ImageReadError(f"Cannot read image {self.describe(key)}: {type(error).__name__}: {error}") from error
        x = self.transform(image) if self.transform is not None else image
        if self.turns is not None and self.turns[index]:
            x = torch.rot90(x, self.turns[index], dims=(-2, -1))
        return x, self.labels[index]

    def class_counts(self) -> Counter:
        return Counter(self.labels)

    def with_rotations(self) -> ImageSource:
        """A copy in which each class rotated by 0, 90, 180 and 270 degrees is a class of its own.

        The Omniglot augmentation of Santoro et al. 2016 used by MAML and Meta-SGD: label ``c`` becomes
        ``4c + t`` for a rotation of ``90 t`` degrees (counter-clockwise).
        """
        if self.turns is not None:
            raise ValueError("ImageSource classes are already rotated.")
        out = copy.copy(self)
        out.keys = [key for _ in range(4) for key in self.keys]
        out.turns = [t for t in range(4) for _ in self.keys]
        out.labels = [4 * label + t for t in range(4) for label in self.labels]
        out.class_names = {4 * label + t: f"{name} (rotated {90 * t})" if t else name
                           for label, name in self.class_names.items() for t in range(4)}
        if self.class_groups is not None:  # a rotated character stays in its alphabet
            out.class_groups = {4 * label + t: group for label, group in self.class_groups.items() for t in range(4)}
        return out


class FileImages(ImageSource):
    """Images stored as files, one label per file."""

    def read(self, key: str) -> Image.Image:
        return Image.open(key)


def file_images(classes: Mapping[str, Sequence[Path]], transform: Callable[[Image.Image], Tensor] | None,
                names: Sequence[str] | None = None, prefix: str = "") -> FileImages:
    """A :class:`FileImages` over ``classes`` (name -> files), labelled ``0..`` in the order of ``names``."""
    names = list(classes) if names is None else list(names)
    keys, labels = [], []
    for label, name in enumerate(names):
        keys += [str(path) for path in classes[name]]
        labels += [label] * len(classes[name])
    return FileImages(keys, labels, {label: prefix + name for label, name in enumerate(names)}, transform)


class ArrayImages(ImageSource):
    """Images stored as one uint8 array ``[n, H, W]`` or ``[n, H, W, C]`` (pickled data sets).

    Args:
        images: the array.
        labels: one label per image.
        class_names: a name per label.
        transform: PIL image -> tensor.
        origin: where the array came from, for messages (e.g. a file name).
    """

    def __init__(self, images: Any, labels: Sequence[int], class_names: Mapping[int, str],
                 transform: Callable[[Image.Image], Tensor] | None = None, origin: str = "array") -> None:
        super().__init__(range(len(images)), labels, class_names, transform)
        self.images, self.origin = images, origin

    def read(self, key: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.images[key]))

    def describe(self, key: int) -> str:
        return f"#{key} of {self.origin}"


class DatasetImages(ImageSource):
    """The images of a map-style data set whose items are ``(PIL image or tensor, label)`` (learn2learn's).

    Args:
        dataset: the data set, with no transform of its own.
        labels: one label per item (read from the data set's bookkeeping, not by decoding).
        class_names: a name per label.
        transform: PIL image -> tensor.
        origin: where the data set is stored, for messages.
        paths: one file per item, for messages (instead of ``origin``).
    """

    def __init__(self, dataset: Any, labels: Sequence[int], class_names: Mapping[int, str],
                 transform: Callable[[Image.Image], Tensor] | None = None, origin: str = "the data set",
                 paths: Sequence[str] | None = None) -> None:
        super().__init__(range(len(labels)), labels, class_names, transform)
        self.dataset, self.origin, self.paths = dataset, origin, paths

    def read(self, key: int) -> Image.Image:
        image = self.dataset[key][0]
        if isinstance(image, Tensor):  # [C, H, W], values 0..255
            array = image.to(torch.uint8).permute(1, 2, 0).numpy()
            image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        return image

    def describe(self, key: int) -> str:
        return self.paths[key] if self.paths is not None else f"#{key} of {self.origin}"
