"""The methods' maths, no Lightning: each a :class:`MetaLearner` over a network's parameters.

- :mod:`.contract`: :class:`MetaLearner` (what every method is), :class:`TaskBatchResult`,
  :class:`InnerLoopDivergedError` and the checks the methods share;
- :mod:`.metasgd`: :class:`MetaSGD`, learned per-parameter rates α (and MAML, its fixed-rate case);
- :mod:`.reptile`: :class:`Reptile`, inner SGD/Adam steps and the move of θ towards their result;
- :mod:`.models`: the papers' networks, :class:`SineMLP`, :class:`ConvNet4`, :class:`TaskBatchNorm2d`.
"""

from .contract import InnerLoopDivergedError, MetaLearner, TaskBatchResult, check_task_batch
from .metasgd import MetaSGD
from .models import ConvNet4, SineMLP, TaskBatchNorm2d
from .reptile import Reptile

__all__ = ["ConvNet4", "InnerLoopDivergedError", "MetaLearner", "MetaSGD", "Reptile", "SineMLP", "TaskBatchNorm2d",
           "TaskBatchResult", "check_task_batch"]
