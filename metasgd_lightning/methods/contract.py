"""The contract between a meta-learning method's maths and the recipes that train and use it.

:class:`MetaLearner` is what every method (:class:`~metasgd_lightning.methods.metasgd.MetaSGD`, MAML
as its fixed-rate case, :class:`~metasgd_lightning.methods.reptile.Reptile`) is: an ``nn.Module``
holding the network ``model`` (its parameters are θ) that

- runs the network with given weights: ``forward(x, params)``;
- adapts one task for inference: ``adapt(support_x, support_y, loss_fn, *, steps=None, **options)``,
  the fast weights as a dict;
- adapts a meta-batch and scores its query sets: ``adapt_tasks(support_x, support_y, query_x, query_y,
  loss_fn, *, steps=None, vectorize="auto", **options)``, a :class:`TaskBatchResult`.

Every option after the loss function is a keyword. The rest of this module is what the methods
share: the result type, the divergence error, the meta-batch check and argument checks.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .fast_paths import ChannelsLastImages, use_task_batch_norm

LossFn = Callable[[Tensor, Tensor], Tensor]
Params = dict[str, Tensor]
Vectorize = Literal["auto", "loop", "vmap"]

__all__ = [
    "InnerLoopDivergedError",
    "LossFn",
    "MetaLearner",
    "Params",
    "TaskBatchResult",
    "Vectorize",
    "check_bool",
    "check_positive_int",
    "check_task_batch",
    "choose_vectorize",
    "float32_under_float16_autocast",
    "has_native_batch_norm",
    "require_autograd",
]


class MetaLearner(nn.Module, abc.ABC):
    """A meta-learning method's maths: the network θ, and how it adapts to a task.

    Subclasses implement :meth:`adapt` and :meth:`adapt_tasks` with keyword-only options of their
    own (Meta-SGD: ``first_order``, ``step_weights``; Reptile: ``batch_size``, ``seeds``) and set
    ``learn_lr`` (whether they meta-learn inner-loop rates α, held in ``lrs``).

    Every method applies the CPU fast paths of :mod:`~metasgd_lightning.methods.fast_paths` to the
    network it is given, whatever network that is.

    Args:
        model: the network; its trainable parameters are θ. Parameters with ``requires_grad=False``
            are used as they are and not adapted.
        inner_steps: inner steps of an adaptation when a call gives none (``k``).
        channels_last: on CPU, run a network with 2-d convolutions on channels-last images (the same
            results, faster; off by itself for a network that cannot take them).
        fast_batch_norm: replace the network's ``nn.BatchNorm2d(track_running_stats=False)`` layers by
            :class:`~metasgd_lightning.methods.fast_paths.TaskBatchNorm2d` holding the same weights (the
            same results; a fused double backward on CPU, and second-order ``vmap``).
    """

    learn_lr: bool = False

    def __init__(self, model: nn.Module, inner_steps: int, *, channels_last: bool = True,
                 fast_batch_norm: bool = True) -> None:
        super().__init__()
        self.inner_steps = check_positive_int("inner_steps", inner_steps)
        if check_bool("fast_batch_norm", fast_batch_norm):
            use_task_batch_norm(model)
        self.model = model
        self._images = ChannelsLastImages(model, check_bool("channels_last", channels_last))
        self.adapted_names: tuple[str, ...] = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        if not self.adapted_names:
            raise ValueError(f"{type(self).__name__} needs a model with at least one parameter with "
                             "requires_grad=True; got none.")

    def forward(self, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Run the model with the weights ``params`` (e.g. from :meth:`adapt`), or with θ if ``None``."""
        if params is None:
            return self._images(self.model, x)
        params = dict(params)
        return self._images(lambda images: functional_call(self.model, params, (images,), strict=False), x)

    @abc.abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn, *, steps: int | None = None,
              **options) -> Params:
        """The fast weights of one task after ``steps`` inner steps on its support set (all parameters)."""

    @abc.abstractmethod
    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_fn: LossFn, *,
                    steps: int | None = None, vectorize: Vectorize = "auto", **options) -> TaskBatchResult:
        """Adapt each task of a meta-batch (leading task dimension) on its support set and score its query set."""

    def _steps(self, steps: int | None) -> int:
        return self.inner_steps if steps is None else check_positive_int("steps", steps)

    def _with_frozen(self, fast: Params) -> Params:
        """``fast`` with the parameters that are not adapted added, as they are."""
        frozen = {n: p for n, p in self.model.named_parameters() if not p.requires_grad}
        return {**frozen, **fast}


def choose_vectorize(vectorize: Vectorize, device: torch.device, vmap_ok: bool = True) -> Literal["loop", "vmap"]:
    """``"auto"`` resolved: vmap on GPUs (where one batched kernel beats a launch per task), the loop elsewhere."""
    if vectorize not in ("auto", "loop", "vmap"):
        raise ValueError(f"`vectorize` must be 'auto', 'loop' or 'vmap'; got {vectorize!r}.")
    if vectorize == "auto":
        return "vmap" if device.type == "cuda" and vmap_ok else "loop"
    return vectorize


def has_native_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` uses torch's own batch-norm layers (whose double backward under vmap is wrong)."""
    native = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, native) for m in model.modules())


class InnerLoopDivergedError(FloatingPointError):
    """A loss in the inner loop (or the query loss right after it) became NaN or infinite.

    Attributes:
        step: the support loss that was non-finite: ``s < steps`` is the loss before inner step
            ``s``, ``s == steps`` the loss after the last step; ``None`` for the query loss.
        steps: the number of inner steps of the adaptation (``None`` if unknown).
        task: index of the first offending task in the meta-batch.
        value: the offending loss value.
    """

    def __init__(self, step: int | None, task: int, value: float, stage: str = "", steps: int | None = None):
        self.step, self.task, self.value, self.steps = step, task, value, steps
        if step is None:
            where = "query loss after the inner loop"
        elif steps is not None and step >= steps:
            where = f"support loss after the last inner step (step {steps - 1})"
        else:
            where = f"support loss at inner step {step}"
        prefix = f"{stage}: " if stage else ""
        super().__init__(
            f"{prefix}the {where} of task {task} in the meta-batch is {value} (not finite). "
            "The inner loop diverged: lower `init_lr` (the initial inner-loop rate α), the meta learning rate, "
            "or the number of inner steps, keep `line_search` on for several steps, clip meta-gradients with "
            "`gradient_clip_val`, or check the data for NaN/inf."
        )


@dataclass
class TaskBatchResult:
    """What adapting a meta-batch of tasks gives.

    Attributes:
        query_loss: ``[tasks]`` query loss of each task after adaptation (differentiable).
        query_output: ``[tasks, queries, ...]`` the adapted model's outputs on the query inputs.
        support_loss: ``[tasks, steps + 1]`` support loss before each inner step and after the last
            one (detached; the gap between the first and last column is the adaptation gain).
        step_scale: ``[tasks, steps]`` the share of each step α ⊙ ∇L that was taken: 1 without line
            search; with it, 1, 1/2, 1/4, … or 0 (the step would have raised the support loss).
    """

    query_loss: Tensor
    query_output: Tensor
    support_loss: Tensor
    step_scale: Tensor

    def raise_if_not_finite(self, stage: str = "") -> None:
        """Raise :class:`InnerLoopDivergedError` naming the first non-finite step and task."""
        bad_support = ~torch.isfinite(self.support_loss)
        bad_query = ~torch.isfinite(self.query_loss.detach())
        if not (bad_support.any() | bad_query.any()):  # one device sync per meta-batch
            return
        steps = self.support_loss.shape[1] - 1
        if bad_support.any():
            # The first inner step at which any task diverged, then the first task at that step.
            step = int(bad_support.any(dim=0).nonzero()[0])
            task = int(bad_support[:, step].nonzero()[0])
            raise InnerLoopDivergedError(step, task, float(self.support_loss[task, step]), stage, steps)
        task = int(bad_query.nonzero()[0])
        raise InnerLoopDivergedError(None, task, float(self.query_loss[task]), stage, steps)


def check_task_batch(batch: object) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check that ``batch`` is ``(support_x, support_y, query_x, query_y)`` with one leading task dimension.

    Raises:
        ValueError: naming the tensor, the expected shape and the shape given.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 4 or not all(isinstance(t, Tensor) for t in batch):
        got = type(batch).__name__ if not isinstance(batch, (tuple, list)) else f"a {len(batch)}-item {type(batch).__name__}"
        raise ValueError(
            "A meta-batch must be 4 tensors (support_x, support_y, query_x, query_y), each with a leading "
            f"task dimension; got {got}."
        )
    support_x, support_y, query_x, query_y = batch
    tasks = support_x.shape[0] if support_x.dim() else None
    for name, t, min_dim in (("support_x", support_x, 2), ("support_y", support_y, 2), ("query_x", query_x, 2), ("query_y", query_y, 2)):
        if t.dim() < min_dim or t.shape[0] != tasks:
            raise ValueError(
                f"{name} must have shape [tasks, examples, ...] with the same number of tasks as support_x "
                f"({tasks}); got shape {tuple(t.shape)}."
            )
    for x_name, x, y_name, y in (("support_x", support_x, "support_y", support_y), ("query_x", query_x, "query_y", query_y)):
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"{x_name} and {y_name} must hold the same number of examples per task; got "
                f"{x_name} {tuple(x.shape)} and {y_name} {tuple(y.shape)}."
            )
    if support_x.shape[2:] != query_x.shape[2:]:
        raise ValueError(
            "support_x and query_x must have the same example shape; got "
            f"{tuple(support_x.shape[2:])} and {tuple(query_x.shape[2:])}."
        )
    return support_x, support_y, query_x, query_y


def check_positive_int(name: str, value: object, minimum: int = 1, or_none: bool = False) -> int | None:
    """``value`` if it is an integer >= ``minimum`` (or ``None`` where allowed); else a ValueError naming ``name``."""
    if value is None and or_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {expected}{' or None' if or_none else ''}; got {value!r}.")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False``; else a ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False; got {value!r}.")
    return value


def float32_under_float16_autocast(device_type: str):
    """Run the support pass and its gradient in float32 when float16 autocast is on (``16-mixed``).

    The inner-loop gradient is taken with ``torch.autograd.grad``/``torch.func``, outside the loss
    scaler that protects the meta-gradient, so float16 would flush its small entries to zero without
    a word. bfloat16 has float32's exponent range and keeps running in bfloat16.
    """
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Meta-learners adapt with gradients, which torch.inference_mode() forbids. With Lightning, build the "
            "Trainer with `inference_mode=False` (YAML: `trainer: {inference_mode: false}`); otherwise call "
            "outside inference_mode."
        )
