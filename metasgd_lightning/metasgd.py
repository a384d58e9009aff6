"""Meta-SGD: a model's initialisation θ and a learned rate α per parameter entry.

The inner loop is a pure function of a parameter dict: θ' = θ − α ⊙ ∇θ L_support(θ), computed with
``torch.func.functional_call``. No module is cloned and θ itself is never written to, so the outer
loss L_query(θ') backpropagates into both θ and α. This module holds the maths only (no Lightning).
"""

from __future__ import annotations

import contextlib
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

__all__ = ["MetaSGD", "InnerLoopDivergedError", "TaskBatchResult", "check_task_batch", "multi_step_loss_weights"]


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


def multi_step_loss_weights(steps: int, epoch: int, anneal_epochs: int) -> Tensor:
    """MAML++'s multi-step loss weights: one weight per inner step, annealed towards the last step.

    At epoch 0 every step weighs ``1/steps``; each epoch moves ``1/(steps * anneal_epochs)`` of weight
    from every earlier step (down to a floor of ``0.03/steps``) to the last; from ``anneal_epochs`` on,
    only the last step counts. The weights always sum to 1.

    Reference: Antoniou, Edwards and Storkey (2019). How to train your MAML. ICLR.

    Example:
        >>> multi_step_loss_weights(steps=4, epoch=0, anneal_epochs=10)
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    if epoch >= anneal_epochs:
        return torch.nn.functional.one_hot(torch.tensor(steps - 1), steps).float()
    earlier = max(1.0 / steps - epoch / (steps * anneal_epochs), 0.03 / steps)
    weights = torch.full((steps,), earlier)
    weights[-1] = 1.0 - earlier * (steps - 1)
    return weights


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
        per_step_lr: learn a separate α for each inner step (MAML++'s per-step rates applied to
            Meta-SGD's per-parameter rates); α then has shape ``[inner_steps, *param.shape]``.

    Reference:
        Li, Zhou, Chen and Li (2017). Meta-SGD: Learning to Learn Quickly for Few-Shot Learning.
        arXiv:1707.09835. Per-step rates: Antoniou, Edwards and Storkey (2019). How to train your MAML.

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
        per_step_lr: bool = False,
    ) -> None:
        super().__init__()
        self.inner_steps = _check_positive_int("inner_steps", inner_steps)
        low, high = _parse_init_lr(init_lr, learn_lr)
        if per_step_lr and not learn_lr:
            raise ValueError("`per_step_lr=True` learns one α per inner step, which needs `learn_lr=True`.")
        self.per_step_lr = bool(per_step_lr)
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
                shape = (inner_steps, *param.shape) if per_step_lr else param.shape
                alpha = torch.empty(shape, dtype=param.dtype, device=param.device).uniform_(low, high)
            else:
                alpha = torch.tensor(low, dtype=param.dtype, device=param.device)
            self.lrs[_lr_key(name)] = nn.Parameter(alpha, requires_grad=learn_lr)

    def lr(self, param_name: str, step: int = 0) -> Tensor:
        """The rate α of the model parameter named ``param_name`` (as in ``model.named_parameters()``).

        With ``per_step_lr``, the rate of inner step ``step``; steps past ``inner_steps`` (e.g. more
        steps at evaluation) reuse the last step's rate.
        """
        alpha = self.lrs[_lr_key(param_name)]
        return alpha[min(step, len(alpha) - 1)] if self.per_step_lr else alpha

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
        step_weights: Tensor | None = None,
    ) -> TaskBatchResult:
        """Adapt to each task of a meta-batch and score its query set.

        Every tensor has a leading task dimension. ``vectorize="vmap"`` runs all tasks at once with
        ``torch.func.vmap`` (pays off on GPUs), ``"loop"`` one after another (cheaper on CPUs),
        ``"auto"`` picks by the device of the inputs. ``steps`` and ``first_order`` override the
        module's settings for this call. ``step_weights`` (``[steps]``) turns on the multi-step loss
        of MAML++: each task's query loss becomes Σᵢ wᵢ L_query(θᵢ) over the weights after every step.

        Returns:
            A :class:`TaskBatchResult`; call its ``raise_if_not_finite()`` to catch divergence.
        """
        steps = self.inner_steps if steps is None else _check_positive_int("steps", steps)
        if vectorize not in ("auto", "loop", "vmap"):
            raise ValueError(f"`vectorize` must be 'auto', 'loop' or 'vmap'; got {vectorize!r}.")
        first_order = self.first_order if first_order is None else first_order
        if step_weights is not None and step_weights.shape != (steps,):
            raise ValueError(f"`step_weights` must have shape ({steps},), one weight per inner step; got {tuple(step_weights.shape)}.")
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
                def task_fn(sx, sy, qx, qy):
                    return self._task(sx, sy, qx, qy, loss_fn, steps, first_order, step_weights, self._grads_functional)

                query_loss, query_output, support_loss = vmap(task_fn, randomness="different")(
                    support_x, support_y, query_x, query_y
                )
            else:
                results = [
                    self._task(sx, sy, qx, qy, loss_fn, steps, first_order, step_weights, self._grads_autograd)
                    for sx, sy, qx, qy in zip(support_x, support_y, query_x, query_y)
                ]
                query_loss, query_output, support_loss = (torch.stack(r) for r in zip(*results))
        return TaskBatchResult(query_loss, query_output, support_loss.detach())

    # -- the inner loop; gradients by torch.autograd (per task) or torch.func (vmap-able) ----------

    def _sgd_step(self, fast: Params, grads: Mapping[str, Tensor], step: int) -> Params:
        return {n: w - self.lr(n, step) * grads[n] for n, w in fast.items()}

    def _initial_fast_weights(self) -> Params:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.adapted_names}

    def _grads_autograd(self, fast: Params, x: Tensor, y: Tensor, loss_fn: LossFn, first_order: bool):
        loss = loss_fn(self(x, fast), y)
        # First order: no graph through the gradient (create_graph=False), which also saves memory.
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        return dict(zip(fast, grads)), loss

    def _grads_functional(self, fast: Params, x: Tensor, y: Tensor, loss_fn: LossFn, first_order: bool):
        grads, loss = grad_and_value(lambda weights: loss_fn(self(x, weights), y))(fast)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        return grads, loss

    def _inner_loop(self, x, y, loss_fn, steps, first_order, grad_fn, on_step=None) -> tuple[Params, list[Tensor]]:
        """``steps`` updates from θ; returns the fast weights and the support loss before each step."""
        fast, losses = self._initial_fast_weights(), []
        for step in range(steps):
            with _float32_under_float16_autocast(x.device.type):
                grads, loss = grad_fn(fast, x, y, loss_fn, first_order)
            fast = self._sgd_step(fast, grads, step)
            losses.append(loss.detach())
            if on_step is not None:
                on_step(step, fast)
        return fast, losses

    def _adapt_autograd(self, x: Tensor, y: Tensor, loss_fn: LossFn, steps: int, first_order: bool) -> tuple[Params, Tensor]:
        fast, losses = self._inner_loop(x, y, loss_fn, steps, first_order, self._grads_autograd)
        return fast, torch.stack(losses)

    def _task(self, sx, sy, qx, qy, loss_fn, steps, first_order, step_weights, grad_fn):
        """Adapt to one task; query loss (step-weighted if ``step_weights``), query output, support losses."""
        intermediate: list[Tensor] = []

        def score_intermediate(step: int, fast: Params) -> None:
            if step < steps - 1:
                intermediate.append(loss_fn(self(qx, fast), qy))

        on_step = score_intermediate if step_weights is not None else None
        fast, support_losses = self._inner_loop(sx, sy, loss_fn, steps, first_order, grad_fn, on_step)
        support_losses.append(loss_fn(self(sx, fast), sy).detach())
        query_output = self(qx, fast)
        query_loss = loss_fn(query_output, qy)
        if step_weights is not None:
            query_loss = (step_weights * torch.stack([*intermediate, query_loss])).sum()
        return query_loss, query_output, torch.stack(support_losses)


def _float32_under_float16_autocast(device_type: str):
    """Run the support pass and its gradient in float32 when float16 autocast is on (``16-mixed``).

    The inner-loop gradient is taken with ``torch.autograd.grad``/``torch.func``, outside the loss
    scaler that protects the meta-gradient, so float16 would flush its small entries to zero without
    a word. bfloat16 has float32's exponent range and keeps running in bfloat16.
    """
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Meta-SGD adapts with gradients, which torch.inference_mode() forbids. With Lightning, build the "
            "Trainer with `inference_mode=False` (YAML: `trainer: {inference_mode: false}`); otherwise call "
            "outside inference_mode."
        )
