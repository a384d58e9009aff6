"""metasgd-lightning: Meta-SGD (Li et al., 2017) as PyTorch Lightning modules.

- :class:`MetaSGD` (``metasgd.py``): the maths (θ and a learned rate α per parameter entry), no Lightning.
- :class:`MetaSGDLightningModule` (``module.py``): the training recipe, with manual optimisation.
- :class:`Reptile` (``reptile.py``) and :class:`ReptileLightningModule` (``module.py``): Reptile (Nichol et
  al., 2018), the first-order method that moves θ towards each task's trained weights, on the same recipe.
- :mod:`metasgd_lightning.models`: the networks of the papers; ``metrics.py``: :class:`TaskMeanCI`.
- ``callbacks.py``: the checkpoint and α-monitor callbacks; ``progress.py``: the progress bar (lines when not
  a terminal); ``tensorboard_views.py``: the validation band and figures in TensorBoard.
- ``cli.py``: the ``metasgd`` command (``_parser.py``: its parser); ``plotting.py``: ``metasgd plot-lrs``;
  ``task_plots.py``: ``metasgd plot-sine`` and ``plot-tasks``; ``inference.py``: use a checkpoint on a new
  task; ``adapt_command.py``: ``metasgd adapt``.

The data modules are the separate package :mod:`datamodules`, which this one imports (never the other way).
"""

from .metasgd import InnerLoopDivergedError, MetaSGD, TaskBatchResult
from .metrics import TaskMeanCI
from .models import ConvNet4, SineMLP
from .module import MetaLearningModule, MetaSGDLightningModule, ReptileLightningModule
from .reptile import Reptile

__all__ = [
    "ConvNet4",
    "InnerLoopDivergedError",
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
