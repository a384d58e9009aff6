"""Episodic LightningDataModules: each batch is a meta-batch ``(support_x, support_y, query_x, query_y)``."""

from .sine import SineDataModule

__all__ = ["SineDataModule"]
