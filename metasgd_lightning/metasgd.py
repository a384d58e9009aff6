"""Meta-SGD: a model's initialisation θ and a learned rate α per parameter entry.

The inner loop is a pure function of a parameter dict: θ' = θ − α ⊙ ∇θ L_support(θ), computed with
``torch.func.functional_call``. No module is cloned and θ itself is never written to, so the outer
loss L_query(θ') backpropagates into both θ and α. This module holds the maths only (no Lightning).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]
Params = dict[str, Tensor]
Vectorize = Literal["auto", "loop", "vmap"]

__all__ = ["MetaSGD", "InnerLoopDivergedError", "TaskBatchResult", "check_task_batch"]


class InnerLoopDivergedError(FloatingPointError):
    """A loss in the inner loop (or the query loss right after it) became NaN or infinite.

    Attributes:
        step: inner step whose support loss was non-finite, or ``None`` for the query loss after
            the last step.
        task: index of the first offending task in the meta-batch.
        value: the offending loss value.
    """

    def __init__(self, step: int | None, task: int, value: float, stage: str = ""):
        self.step, self.task, self.value = step, task, value
        where = f"support loss at inner step {step}" if step is not None else "query loss after the inner loop"
        prefix = f"{stage}: " if stage else ""
        super().__init__(
            f"{prefix}the {where} of task {task} in the meta-batch is {value} (not finite). "
            "The inner loop diverged: lower `init_lr` (the initial inner-loop rate α), the meta learning rate, "
            "or the number of inner steps, clip meta-gradients with `gradient_clip_val`, or check the data for NaN/inf."
        )


@dataclass
class TaskBatchResult:
    """What adapting a meta-batch of tasks gives.

    Attributes:
        query_loss: ``[tasks]`` query loss of each task after adaptation (differentiable).
        query_output: ``[tasks, queries, ...]`` the adapted model's outputs on the query inputs.
        support_loss: ``[tasks, steps + 1]`` support loss before each inner step and after the last
            one (detached; the gap between the first and last column is the adaptation gain).
    """

    query_loss: Tensor
    query_output: Tensor
    support_loss: Tensor

    def raise_if_not_finite(self, stage: str = "") -> None:
        """Raise :class:`InnerLoopDivergedError` naming the first non-finite step and task."""
        bad_support = ~torch.isfinite(self.support_loss)
        bad_query = ~torch.isfinite(self.query_loss.detach())
        if not (bad_support.any() | bad_query.any()):  # one device sync per meta-batch
            return
        if bad_support.any():
            # The first inner step at which any task diverged, then the first task at that step.
            step = int(bad_support.any(dim=0).nonzero()[0])
            task = int(bad_support[:, step].nonzero()[0])
            steps = self.support_loss.shape[1] - 1
            raise InnerLoopDivergedError(
                step if step < steps else None, task, float(self.support_loss[task, step]), stage
            )
        task = int(bad_query.nonzero()[0])
        raise InnerLoopDivergedError(None, task, float(self.query_loss[task]), stage)


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


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return value


def _parse_init_lr(init_lr: float | tuple[float, float] | list[float], learn_lr: bool) -> tuple[float, float]:
    if isinstance(init_lr, (tuple, list)):
        if len(init_lr) != 2:
            raise ValueError(f"`init_lr` must be a float or a (low, high) pair; got {init_lr!r}.")
        low, high = (float(v) for v in init_lr)
        if not learn_lr and low != high:
            raise ValueError(
                f"`init_lr={tuple(init_lr)}` draws random rates, but `learn_lr=False` (MAML) uses one fixed "
                "scalar rate: give a single float."
            )
    elif isinstance(init_lr, (int, float)) and not isinstance(init_lr, bool):
        low = high = float(init_lr)
    else:
        raise ValueError(f"`init_lr` must be a float or a (low, high) pair; got {init_lr!r}.")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"`init_lr` must be finite; got {init_lr!r}.")
    if low > high:
        raise ValueError(f"`init_lr=(low, high)` needs low <= high; got {init_lr!r}.")
    return low, high


def _lr_key(param_name: str) -> str:
    # nn.ParameterDict keys may not contain '.', and parameter names never contain '-'.
    return param_name.replace(".", "-")


class MetaSGD(nn.Module):
    """Meta-SGD: meta-learns a model's initialisation θ and a per-parameter learning rate α.

    The inner loop adapts θ on a task's support set with θ' = θ − α ⊙ ∇θ L_support(θ); the outer
    (meta) loss is the query loss of θ', and it is differentiable with respect to both θ and α.

    Args:
        model: the network; its trainable parameters are θ. Parameters with
            ``requires_grad=False`` are used as they are, not adapted, and get no α.
        init_lr: the initial α: a float for a constant, or a ``(low, high)`` pair to draw each
            entry uniformly, as in the paper (``(0.005, 0.1)`` for sine regression).
        inner_steps: number of inner-loop steps of :meth:`adapt` by default.
        first_order: drop second-order terms (the gradient through ∇θ L); α still gets a
            meta-gradient, since θ' depends on it directly.
        learn_lr: ``False`` gives MAML: one fixed scalar rate ``init_lr`` for every parameter.

    Reference:
        Li, Zhou, Chen and Li (2017). Meta-SGD: Learning to Learn Quickly for Few-Shot Learning.
        arXiv:1707.09835.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> meta = MetaSGD(torch.nn.Linear(1, 1), init_lr=0.1)
        >>> x, y = torch.randn(5, 1), torch.randn(5, 1)
        >>> fast = meta.adapt(x, y, F.mse_loss)           # θ', a dict of tensors
        >>> meta_loss = F.mse_loss(meta(x, fast), y)     # differentiable in θ and α
        >>> meta_loss.backward()
        >>> meta.lrs["weight"].grad.shape
        torch.Size([1, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        init_lr: float | tuple[float, float] = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        learn_lr: bool = True,
    ) -> None:
        super().__init__()
        self.inner_steps = _check_positive_int("inner_steps", inner_steps)
        low, high = _parse_init_lr(init_lr, learn_lr)
        self.model = model
        self.first_order = bool(first_order)
        self.learn_lr = bool(learn_lr)
        self.adapted_names: tuple[str, ...] = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        if not self.adapted_names:
            raise ValueError("MetaSGD needs a model with at least one parameter with requires_grad=True; got none.")
        self.lrs = nn.ParameterDict()
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if learn_lr:
                alpha = torch.empty_like(param, requires_grad=False).uniform_(low, high)
            else:
                alpha = torch.tensor(low, dtype=param.dtype, device=param.device)
            self.lrs[_lr_key(name)] = nn.Parameter(alpha, requires_grad=learn_lr)

    def lr(self, param_name: str) -> Tensor:
        """The rate α of the model parameter named ``param_name`` (as in ``model.named_parameters()``)."""
        return self.lrs[_lr_key(param_name)]

    def forward(self, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Run the model with the weights ``params`` (e.g. from :meth:`adapt`), or with θ if ``None``."""
        if params is None:
            return self.model(x)
        return functional_call(self.model, dict(params), (x,), strict=False)

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        loss_fn: LossFn,
        steps: int | None = None,
        first_order: bool | None = None,
    ) -> Params:
        """Adapt to one task: ``steps`` Meta-SGD steps on its support set, starting from θ.

        Args:
            support_x: the task's support inputs, ``[examples, ...]``.
            support_y: their targets.
            loss_fn: ``loss_fn(outputs, targets)``, a scalar (e.g. ``F.cross_entropy``).
            steps: inner steps; defaults to ``inner_steps``.
            first_order: overrides ``first_order`` for this call (``True`` at evaluation, where no
                meta-gradient is needed, saves memory; the fast weights are the same).

        Returns:
            The fast weights θ': a dict from parameter name to tensor, for :meth:`forward`. Frozen
            parameters appear unchanged.

        Raises:
            InnerLoopDivergedError: a support loss became NaN or infinite (the step is named).
        """
        steps = self.inner_steps if steps is None else _check_positive_int("steps", steps)
        first_order = self.first_order if first_order is None else first_order
        _require_autograd()
        with torch.enable_grad():
            fast, support_loss = self._adapt_autograd(support_x, support_y, loss_fn, steps, first_order)
        bad = ~torch.isfinite(support_loss)
        if bad.any():
            step = int(bad.nonzero()[0])
            raise InnerLoopDivergedError(step, 0, float(support_loss[step]))
        frozen = {n: p for n, p in self.model.named_parameters() if not p.requires_grad}
        return {**frozen, **fast}

    def adapt_tasks(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        loss_fn: LossFn,
        steps: int | None = None,
        vectorize: Vectorize = "auto",
        first_order: bool | None = None,
    ) -> TaskBatchResult:
        """Adapt to each task of a meta-batch and score its query set.

        Every tensor has a leading task dimension. ``vectorize="vmap"`` runs all tasks at once with
        ``torch.func.vmap`` (pays off on GPUs), ``"loop"`` one after another (cheaper on CPUs),
        ``"auto"`` picks by the device of the inputs. ``steps`` and ``first_order`` override the
        module's settings for this call.

        Returns:
            A :class:`TaskBatchResult`; call its ``raise_if_not_finite()`` to catch divergence.
        """
        steps = self.inner_steps if steps is None else _check_positive_int("steps", steps)
        if vectorize not in ("auto", "loop", "vmap"):
            raise ValueError(f"`vectorize` must be 'auto', 'loop' or 'vmap'; got {vectorize!r}.")
        first_order = self.first_order if first_order is None else first_order
        native_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if vectorize == "auto":
            vmap_ok = not (native_bn and not first_order)
            vectorize = "vmap" if support_x.device.type == "cuda" and vmap_ok else "loop"
        elif vectorize == "vmap" and native_bn and not first_order:
            raise ValueError(
                "vectorize='vmap' with second-order meta-gradients gives wrong gradients through torch's native "
                "BatchNorm layers (torch.func limitation). Use vectorize='loop', first_order=True, or "
                "metasgd_lightning.models.TaskBatchNorm2d in the model."
            )
        _require_autograd()
        with torch.enable_grad():
            if vectorize == "vmap":
                task_fn = lambda sx, sy, qx, qy: self._task_functional(sx, sy, qx, qy, loss_fn, steps, first_order)  # noqa: E731
                query_loss, query_output, support_loss = vmap(task_fn, randomness="different")(
                    support_x, support_y, query_x, query_y
                )
            else:
                results = [
                    self._task_autograd(sx, sy, qx, qy, loss_fn, steps, first_order)
                    for sx, sy, qx, qy in zip(support_x, support_y, query_x, query_y)
                ]
                query_loss, query_output, support_loss = (torch.stack(r) for r in zip(*results))
        return TaskBatchResult(query_loss, query_output, support_loss.detach())

    # -- the inner loop, two ways: torch.autograd (per task) and torch.func (vmap-able) ----------

    def _sgd_step(self, fast: Params, grads: Mapping[str, Tensor]) -> Params:
        return {n: w - self.lr(n) * grads[n] for n, w in fast.items()}

    def _initial_fast_weights(self) -> Params:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.adapted_names}

    def _adapt_autograd(self, x: Tensor, y: Tensor, loss_fn: LossFn, steps: int, first_order: bool) -> tuple[Params, Tensor]:
        fast = self._initial_fast_weights()
        losses = []
        for _ in range(steps):
            loss = loss_fn(self(x, fast), y)
            # First order: no graph through the gradient (create_graph=False), which also saves memory.
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = self._sgd_step(fast, dict(zip(fast, grads)))
            losses.append(loss.detach())
        return fast, torch.stack(losses)

    def _task_autograd(self, sx, sy, qx, qy, loss_fn, steps, first_order):
        fast, support_losses = self._adapt_autograd(sx, sy, loss_fn, steps, first_order)
        with torch.no_grad():
            final_support = loss_fn(self(sx, fast), sy)
        query_output = self(qx, fast)
        return loss_fn(query_output, qy), query_output, torch.cat([support_losses, final_support[None]])

    def _task_functional(self, sx, sy, qx, qy, loss_fn, steps, first_order):
        def support_loss(fast: Params) -> Tensor:
            return loss_fn(self(sx, fast), sy)

        fast = self._initial_fast_weights()
        losses = []
        for _ in range(steps):
            grads, loss = grad_and_value(support_loss)(fast)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            fast = self._sgd_step(fast, grads)
            losses.append(loss.detach())
        losses.append(support_loss(fast).detach())
        query_output = self(qx, fast)
        return loss_fn(query_output, qy), query_output, torch.stack(losses)


def _require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Meta-SGD adapts with gradients, which torch.inference_mode() forbids. With Lightning, build the "
            "Trainer with `inference_mode=False` (YAML: `trainer: {inference_mode: false}`); otherwise call "
            "outside inference_mode."
        )
