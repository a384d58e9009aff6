"""Episodic LightningDataModules: each batch is a meta-batch ``(support_x, support_y, query_x, query_y)``.

Where things live (this package imports nothing of ``metasgd_lightning``; the arrow runs the other way):

- The data modules, one file per source: ``sine.py`` (:class:`SineDataModule`), ``omniglot.py``
  (:class:`OmniglotDataModule`), ``imagenet.py`` (mini- and tiered-ImageNet), ``cifar.py`` (CIFAR-FS,
  FC100), ``image_folder.py`` (:class:`ImageFolderDataModule`, your own images) and ``lake_oneshot.py``
  (:class:`OmniglotOneShotDataModule`, the 20 runs of Lake et al.'s one-shot challenge).
- ``episodic.py``: :class:`EpisodicDataModule`, the base of the image data modules (split checks,
  learn2learn ``MetaDataset``, task loaders, ``transform(split)``).
- ``learn2learn_benchmark.py``: ``Learn2LearnBenchmark``, the base of the four sets that learn2learn
  downloads (missing -> fetch -> open -> unreadable, said once; ``cifar.py`` adds ``CIFAR100Benchmark``
  for the two 32x32 sets).
- ``images.py``: image sources, the labelled images of a split decoded in DataLoader workers
  (``ImageSource``, ``FileImages``, ``ArrayImages``, ``DatasetImages``, ``ImageReadError``).
- ``preprocessing.py``: ``ImageTransform`` (PIL image -> tensor) and the standard augmentation.
- ``class_folders.py``: class folders on disk (``find_class_folders``, ``visible``, ``split_classes``).
- ``tasks.py``: ``EpisodicTasks``, the N-way K-shot task set of a split, and ``split_support_query``.
- ``sampling.py``: task seeds, ``seeded_global_rngs``, the DDP-aware task samplers, ``TaskLoaders``.
- ``downloads.py``: ``cleanup_on_failure``, ``DownloadError`` and the errors for bad data files.
- ``checks.py``: argument checks (``check_int`` and friends) with errors that name the argument.
- ``learn2learn_import.py``: ``import_learn2learn``, learn2learn without gym's banner.

Names that lived in ``episodic.py`` or ``image_folder.py`` before the split are still importable there.
"""

from .cifar import CIFARFSDataModule, FC100DataModule
from .episodic import EpisodicDataModule
from .image_folder import ImageFolderDataModule
from .imagenet import MiniImageNetDataModule, TieredImageNetDataModule
from .lake_oneshot import OmniglotOneShotDataModule
from .omniglot import OmniglotDataModule
from .sine import SineDataModule

__all__ = [
    "SineDataModule",
    "EpisodicDataModule",
    "OmniglotDataModule",
    "MiniImageNetDataModule",
    "TieredImageNetDataModule",
    "CIFARFSDataModule",
    "FC100DataModule",
    "ImageFolderDataModule",
    "OmniglotOneShotDataModule",
]
