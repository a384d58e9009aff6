"""Callbacks with Meta-SGD's defaults."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["MetaSGDCheckpoint"]


class MetaSGDCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` and the best checkpoint by the module's validation metric.

    With ``monitor="auto"`` (the default) the metric comes from the module: ``val/acc`` (higher is
    better) for classification, ``val/mse`` (lower is better) for regression. Every other argument
    is ``ModelCheckpoint``'s.
    """

    def __init__(self, *args, monitor: str | None = "auto", save_last: bool | None = True,
                 filename: str | None = "best-{step}", **kwargs) -> None:
        super().__init__(*args, monitor=monitor, save_last=save_last, filename=filename, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.monitor == "auto":
            self.monitor, self.mode = getattr(pl_module, "monitor", (None, "min"))
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
        super().setup(trainer, pl_module, stage)
