"""Few-shot image classification tasks drawn from a learn2learn ``MetaDataset`` per split.

A task is ``ways`` classes with ``shots`` support and ``queries`` query images each. It is a pure
function of ``(seed, split, global task index)`` (see :mod:`datamodules.sampling`): learn2learn's
task transforms (``NWays``, ``KShots``, ``LoadData``, ``RemapLabels``) run with Python's and torch's
global random generators seeded from :func:`~datamodules.sampling.task_seed` and restored afterwards,
so the same seed gives the same tasks whatever the number of workers or devices.

Images are decoded inside ``Dataset.__getitem__``, that is in the DataLoader's worker processes.
"""

from __future__ import annotations

import abc

import contextlib
import copy
import os
import pickle
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from metasgd_lightning._quiet import import_learn2learn

from .sampling import SPLITS, TaskLoaders, task_seed

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


class ImageReadError(RuntimeError):
    """An image file (or record) that cannot be decoded."""


class DownloadError(RuntimeError):
    """A download that failed or gave something other than the data."""


# -- argument checks ------------------------------------------------------------------------------


def check_int(owner: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner} `{name}` must be an integer >= {minimum}; got {value!r}.")
    return value


def check_fractions(owner: str, fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not 0.0 <= f <= 1.0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{owner} `fractions` must be three numbers in [0, 1] (train, val, test) that sum to 1; "
                         f"got {tuple(fractions)!r}.")
    return values  # type: ignore[return-value]


def check_normalisation(owner: str, channels: int, mean: Sequence[float] | None,
                        std: Sequence[float] | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if (mean is None) != (std is None):
        raise ValueError(f"{owner} needs both `mean` and `std` or neither; got mean={mean!r}, std={std!r}.")
    if mean is None:
        return None, None
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise ValueError(f"{owner} `mean` and `std` must have one value per channel ({channels}) and std > 0; "
                         f"got mean={mean!r}, std={std!r}.")
    return mean, std


# -- images ---------------------------------------------------------------------------------------


class ImageTransform:
    """PIL image -> float tensor ``[channels, image_size, image_size]`` in [0, 1], then optional steps.

    Args:
        image_size: output height and width (``None``: keep the image's size).
        channels: 1 (grey) or 3 (RGB).
        invert: ``1 - x`` (Omniglot: strokes become 1 on a 0 background).
        mean: per-channel mean to subtract (``None``: no normalisation).
        std: per-channel standard deviation to divide by.
        augment: a callable on uint8 ``[C, H, W]`` tensors (torchvision v2 transforms), or ``None``.
        resample: PIL resampling filter of the resize.
    """

    def __init__(self, image_size: int | None, channels: int = 3, invert: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: Callable[[Tensor], Tensor] | None = None,
                 resample: int = Image.Resampling.BILINEAR) -> None:
        self.image_size, self.channels, self.invert, self.augment, self.resample = (
            image_size, channels, invert, augment, resample)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __repr__(self) -> str:
        # Only what differs from the defaults, so that two printed transforms are easy to compare.
        parts = [f"image_size={self.image_size}", f"channels={self.channels}"]
        if self.invert:
            parts.append("invert=True")
        if self.mean is not None:
            parts.append(f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}")
        if self.augment is not None:
            parts.append(f"augment={self.augment!r}")
        if self.resample != Image.Resampling.BILINEAR:
            parts.append(f"resample={Image.Resampling(self.resample).name}")
        return f"ImageTransform({', '.join(parts)})"

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert("L" if self.channels == 1 else "RGB")
        size = self.image_size
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), resample=self.resample)
        x = torch.from_numpy(np.array(image, dtype=np.uint8))
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()
        if self.augment is not None:
            x = self.augment(x)
        x = x.to(torch.float32).div_(255.0)
        if self.invert:
            x = 1.0 - x
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


def standard_augmentation(image_size: int, padding: int, color: bool) -> Callable[[Tensor], Tensor]:
    """Random crop with zero padding, horizontal flip and (colour) jitter: the usual few-shot augmentation.

    The setting of Lee et al. 2019 (MetaOptNet) that learn2learn's ``data_augmentation='lee2019'`` uses.
    """
    from torchvision.transforms import v2  # lazy: keeps `import datamodules` fast

    steps: list[Any] = [v2.RandomCrop(image_size, padding=padding)]
    if color:
        steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
    steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


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
        return out


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


# -- tasks ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` and torch's CPU generator for one task, and restore both afterwards.

    learn2learn's ``NWays``, ``KShots`` and ``RemapLabels`` draw from the global ``random`` module and
    torchvision's random augmentations from torch's global CPU generator; seeding both from the task's
    seed makes a task a pure function of its index. Restoring them leaves the caller's random streams
    untouched (with ``num_workers=0`` this runs in the training process).
    """
    state = random.getstate()
    random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        random.setstate(state)


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


class EpisodicTasks(Dataset):
    """N-way K-shot tasks of one split: item ``i`` is task ``i``, a pure function of ``(seed, split, i)``.

    Each item is ``(support_x [N*K, C, H, W], support_y [N*K], query_x [N*Q, C, H, W], query_y [N*Q])``
    with labels ``0..N-1``. Tasks come from a learn2learn ``Taskset`` with the usual task transforms:
    ``NWays(N)``, ``KShots(K + Q)``, ``LoadData`` and ``RemapLabels``, run under the task's seed.

    Args:
        dataset: the split's ``learn2learn.data.MetaDataset``.
        split: ``"train"``, ``"val"`` or ``"test"`` (part of the task seed).
        length: number of tasks (the length of the dataset; indices beyond it are valid too).
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        seed: the data module's seed.
    """

    def __init__(self, dataset: MetaDataset, split: str, length: int, ways: int, shots: int, queries: int,
                 seed: int) -> None:
        l2l = import_learn2learn()
        transforms = l2l.data.transforms
        self.dataset, self.split, self.length, self.ways, self.shots, self.queries, self.seed = (
            dataset, split, length, ways, shots, queries, seed)
        self.taskset = l2l.data.Taskset(dataset, task_transforms=[
            transforms.NWays(dataset, n=ways),
            transforms.KShots(dataset, k=shots + queries),
            transforms.LoadData(dataset),
            transforms.RemapLabels(dataset),
        ])

    def __len__(self) -> int:
        return self.length

    def __reduce__(self):
        # DataLoader workers started by spawn or forkserver unpickle this; learn2learn must be imported
        # quietly there before the pickled learn2learn objects import it (with gym's banner).
        arguments = (self.dataset, self.split, self.length, self.ways, self.shots, self.queries, self.seed)
        return _restore_tasks, (pickle.dumps(arguments),)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with seeded_global_rngs(task_seed(self.seed, self.split, int(index))):
            description = self.taskset.sample_task_description()
            x, y = self.taskset.get_task(description)  # decodes the images
        return split_support_query(x, y, self.ways, self.shots, self.queries)


def _restore_tasks(arguments: bytes) -> EpisodicTasks:
    import_learn2learn()
    return EpisodicTasks(*pickle.loads(arguments))


# -- downloads ------------------------------------------------------------------------------------


def describe_bad_file(path: Path) -> str:
    """A hint on what a file that should hold data holds instead (empty, or an HTML page)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return ""
    if not head:
        return " (the file is empty)"
    if head.lstrip()[:1] == b"<":
        return " (the file is an HTML page, not the data: the server sent a web page instead of the file)"
    return ""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def cleanup_on_failure(what: str, artifacts: Sequence[Path], hint: str) -> Iterator[None]:
    """Run a download; if it fails, delete what it created among ``artifacts`` and say so.

    A half-written archive or an HTML error page saved under the data's name would otherwise be
    trusted by the next run (learn2learn checks only that the file exists).
    """
    existed = {path: path.exists() for path in artifacts}
    try:
        yield
    except BaseException as error:
        created = [path for path in artifacts if path.exists() and not existed[path]]
        notes = "".join(describe_bad_file(path) for path in created if path.is_file())
        for path in created:
            _remove(path)
        if not isinstance(error, Exception):  # KeyboardInterrupt: clean up, then let it through
            raise
        removed = f" Removed what it left behind: {', '.join(map(str, created))}." if created else ""
        raise DownloadError(f"{what} failed: {type(error).__name__}: {error}{notes}.{removed} {hint}") from error


# -- the data module ------------------------------------------------------------------------------


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
        queries: query images per class (Q).
        meta_batch_size: tasks per meta-batch (per device).
        train_tasks_per_epoch: training tasks in one epoch (steps per epoch = this / meta_batch_size).
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set (600 in the literature's protocol).
        root: folder of the data set.
        download: fetch missing data (in ``prepare_data``, which Lightning runs once per node).
        seed: seed of every task stream.
        num_workers: DataLoader worker processes (they decode the images).

    Example:
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
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{owner} `seed` must be an integer >= 0; got {seed!r}.")
        self.save_hyperparameters()
        self.ways, self.shots, self.queries, self.meta_batch_size = ways, shots, queries, meta_batch_size
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
        :func:`metasgd_lightning.inference.adapt_to_folder`).

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

    def check_split(self, split: str, source: ImageSource) -> None:
        """Errors for a split with fewer classes than ``ways`` or a class with fewer than ``shots + queries`` images."""
        counts = source.class_counts()
        if len(counts) < self.ways:
            raise ValueError(f"{self.name} split '{split}' has {len(counts)} classes, fewer than ways={self.ways}. "
                             f"Lower `ways` or give the split more classes.")
        needed = self.shots + self.queries
        small = [(label, n) for label, n in counts.items() if n < needed]
        if small:
            listed = ", ".join(f"'{source.class_names.get(label, label)}' has {n}" for label, n in small[:5])
            more = f" (and {len(small) - 5} more classes)" if len(small) > 5 else ""
            raise ValueError(f"{self.name} split '{split}': class {listed} images{more}, but every class needs "
                             f"shots + queries = {self.shots} + {self.queries} = {needed}. Lower `shots` or "
                             f"`queries`, or remove the small classes.")

    def tasks(self, split: str, length: int) -> EpisodicTasks:
        """The task set of ``split`` with ``length`` tasks (after :meth:`setup`)."""
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: split '{split}' is not loaded; call setup() first "
                               f"(the Trainer does).")
        return EpisodicTasks(self.datasets[split], split, length, self.ways, self.shots, self.queries, self.seed)

    # -- helpers for subclasses -------------------------------------------------------------------

    def missing_data(self, expected: str, layout: str, how_to_get: str) -> FileNotFoundError:
        """The error for data that is not there and may not be downloaded."""
        return FileNotFoundError(f"{self.name} data not found: expected {expected}. Layout: {layout}. {how_to_get}")

