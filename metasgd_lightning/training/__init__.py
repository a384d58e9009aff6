"""The Lightning training pieces: the recipes on their shared base, metrics, callbacks, checkpoints, progress, TensorBoard.

- :mod:`.base`: :class:`MetaLearningModule`, what every recipe shares;
- :mod:`.metasgd_module`: :class:`MetaSGDLightningModule` and :class:`MAMLLightningModule`;
- :mod:`.reptile_module`: :class:`ReptileLightningModule`;
- :mod:`.metrics`: :class:`TaskMeanCI`; :mod:`.callbacks`, :mod:`.checkpointing`: checkpoints and the α monitor;
- :mod:`.progress`, :mod:`.tensorboard_views`, :mod:`.figures`: what a run shows while it trains;
- :mod:`.cuda_graph`: the training step as one CUDA graph (GPU only).
"""

from .base import MetaLearningModule
from .metasgd_module import MAMLLightningModule, MetaSGDLightningModule
from .metrics import TaskMeanCI
from .reptile_module import ReptileLightningModule

__all__ = ["MAMLLightningModule", "MetaLearningModule", "MetaSGDLightningModule", "ReptileLightningModule", "TaskMeanCI"]
