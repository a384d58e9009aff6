"""Episodic LightningDataModules: each batch is a meta-batch ``(support_x, support_y, query_x, query_y)``."""

from .sine import SineDataModule
from .episodic import EpisodicDataModule
from .omniglot import OmniglotDataModule
from .imagenet import MiniImageNetDataModule, TieredImageNetDataModule
from .cifar import CIFARFSDataModule, FC100DataModule
from .image_folder import ImageFolderDataModule
from .lake_oneshot import OmniglotOneShotDataModule

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
