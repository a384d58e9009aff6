"""metasgd-lightning: Meta-SGD (Li et al., 2017) as PyTorch Lightning modules.

- :class:`MetaSGD`: the maths (θ and a learned rate α per parameter entry), no Lightning.
- :class:`MetaSGDLightningModule`: the training recipe, with manual optimisation.
- :mod:`metasgd_lightning.models`: the networks of the papers.
"""

from .metasgd import InnerLoopDivergedError, MetaSGD, TaskBatchResult
from .metrics import TaskMeanCI
from .models import ConvNet4, SineMLP
from .module import MetaSGDLightningModule

__all__ = [
    "ConvNet4",
    "InnerLoopDivergedError",
    "MetaSGD",
    "MetaSGDLightningModule",
    "SineMLP",
    "TaskBatchResult",
    "TaskMeanCI",
]
__version__ = "0.1.0"
