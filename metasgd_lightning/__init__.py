"""metasgd-lightning: Meta-SGD (Li et al., 2017), MAML and Reptile as PyTorch Lightning modules.

Three layers, imports running one way (each imports only those above it in this list):

- :mod:`.methods`: the maths, no Lightning. :class:`MetaLearner` is the contract every method keeps;
  :class:`MetaSGD` (learned per-parameter rates α; MAML is its fixed-rate case), :class:`Reptile`,
  and the papers' networks (:class:`SineMLP`, :class:`ConvNet4`).
- :mod:`.training`: the Lightning pieces. The recipes :class:`MetaSGDLightningModule`,
  :class:`MAMLLightningModule` and :class:`ReptileLightningModule` on their shared base
  :class:`MetaLearningModule`; metrics, callbacks, checkpoints, progress, TensorBoard.
- :mod:`.commands`: what users run: the ``metasgd`` command, inference on a checkpoint, plots, ``adapt``.

The data modules are the separate package :mod:`datamodules`, which this one imports (never the other way).
"""

from . import _old_paths
from .methods import ConvNet4, InnerLoopDivergedError, MetaLearner, MetaSGD, Reptile, SineMLP, TaskBatchResult
from .training import (
    MAMLLightningModule,
    MetaLearningModule,
    MetaSGDLightningModule,
    ReptileLightningModule,
    TaskMeanCI,
)

_old_paths.install()

__all__ = [
    "ConvNet4",
    "InnerLoopDivergedError",
    "MAMLLightningModule",
    "MetaLearner",
    "MetaSGD",
    "MetaLearningModule",
    "MetaSGDLightningModule",
    "Reptile",
    "ReptileLightningModule",
    "SineMLP",
    "TaskBatchResult",
    "TaskMeanCI",
]
__version__ = "0.1.0"
