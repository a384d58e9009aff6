"""Meta-SGD: a model's initialisation θ and a learned rate α per parameter entry.

The inner loop is a pure function of a parameter dict: θ' = θ − α ⊙ ∇θ L_support(θ), computed with
``torch.func.functional_call``. No module is cloned and θ itself is never written to, so the outer
loss L_query(θ') backpropagates into both θ and α. This module holds the maths only (no Lightning).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from .contract import (
    InnerLoopDivergedError,
    LossFn,
    MetaLearner,
    Params,
    TaskBatchResult,
    Vectorize,
    check_positive_int,
    check_task_batch,
    choose_vectorize,
    float32_under_float16_autocast,
    has_native_batch_norm,
    require_autograd,
)

LineSearch = Literal["auto", "backtracking", "off"]

# The contract's names that this module's old path (metasgd_lightning.metasgd) exported, still importable here.
__all__ = ["InnerLoopDivergedError", "LineSearch", "MetaSGD", "TaskBatchResult", "check_positive_int", "check_task_batch",
           "multi_step_loss_weights"]


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
    if low < 0 or (low == 0 and not learn_lr):
        # Learned rates may turn negative in training, but one that starts there climbs the support loss.
        least = "a positive number (MAML's fixed rate)" if not learn_lr else "0 or more"
        raise ValueError(f"`init_lr` must be {least}: the inner step is θ − α ⊙ ∇L; got {init_lr!r}.")
    return low, high


def _lr_key(param_name: str) -> str:
    # nn.ParameterDict keys may not contain '.', and parameter names never contain '-'.
    return param_name.replace(".", "-")


class MetaSGD(MetaLearner):
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
        line_search: how each inner step is taken. ``"off"``: always the full step θ − α ⊙ ∇L, the
            paper's update. ``"backtracking"``: the full step if it does not raise the task's support
            loss, else the largest of its halves (1/2, 1/4, …, 1/2^max_halvings) that does not,
            else no step: the support loss never rises, however many steps are run. ``"auto"``
            (default): backtracking when an adaptation runs more than one step, the paper's plain
            step when it runs one (the setting of the paper and of learn2learn).
        max_halvings: how many times backtracking halves a step before it leaves the weights as they are.
        channels_last, fast_batch_norm: the CPU fast paths for any network
            (:class:`~metasgd_lightning.methods.contract.MetaLearner`).

    Why backtracking: a learned α is shared by every task, but the largest stable step on a task is
    about 2/λ, λ the largest curvature of that task's support loss, which differs from task to task
    (3x across sine tasks) and grows as θ is meta-learned. One step cannot run away; K steps
    multiply each step's overshoot K times, so the tasks of highest curvature diverge, more so at
    evaluation with more steps than in training, and the meta-gradient through those steps explodes.
    Backtracking gives each task and step its own safe share of the learned step
    (``docs/results.md``, multi-step sine rows).

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
        line_search: LineSearch = "auto",
        max_halvings: int = 5,
        *,
        channels_last: bool = True,
        fast_batch_norm: bool = True,
    ) -> None:
        super().__init__(model, inner_steps, channels_last=channels_last, fast_batch_norm=fast_batch_norm)
        if line_search not in ("auto", "backtracking", "off"):
            raise ValueError(f"`line_search` must be 'auto', 'backtracking' or 'off'; got {line_search!r}.")
        self.line_search = line_search
        self.max_halvings = check_positive_int("max_halvings", max_halvings, minimum=0)
        low, high = _parse_init_lr(init_lr, learn_lr)
        if per_step_lr and not learn_lr:
            raise ValueError("`per_step_lr=True` learns one α per inner step, which needs `learn_lr=True`.")
        self.per_step_lr = bool(per_step_lr)
        self.first_order = bool(first_order)
        self.learn_lr = bool(learn_lr)
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

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        loss_fn: LossFn,
        *,
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
            InnerLoopDivergedError: a support loss, before a step or after the last one, became NaN
                or infinite (the step is named).
        """
        steps = self._steps(steps)
        first_order = self.first_order if first_order is None else first_order
        require_autograd()
        with torch.enable_grad():
            fast, support_loss, _ = self._inner_loop(support_x, support_y, loss_fn, steps, first_order, batched=False)
        bad = ~torch.isfinite(support_loss)
        if bad.any():
            step = int(bad.nonzero()[0])
            raise InnerLoopDivergedError(step, 0, float(support_loss[step]), steps=steps)
        return self._with_frozen(fast)

    def adapt_tasks(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        loss_fn: LossFn,
        *,
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
        steps = self._steps(steps)
        first_order = self.first_order if first_order is None else first_order
        if step_weights is not None and step_weights.shape != (steps,):
            raise ValueError(f"`step_weights` must have shape ({steps},), one weight per inner step; got {tuple(step_weights.shape)}.")
        # torch's native batch norm has wrong double-backward gradients under vmap.
        vmap_ok = first_order or not has_native_batch_norm(self.model)
        if vectorize == "vmap" and not vmap_ok:
            raise ValueError(
                "vectorize='vmap' with second-order meta-gradients gives wrong gradients through torch's native "
                "BatchNorm layers (torch.func limitation). Use vectorize='loop', first_order=True, or "
                "metasgd_lightning.methods.fast_paths.TaskBatchNorm2d in the model (fast_batch_norm=True puts it in "
                "place of nn.BatchNorm2d layers without running statistics)."
            )
        vectorize = choose_vectorize(vectorize, support_x.device, vmap_ok)
        require_autograd()
        with torch.enable_grad():
            def task_fn(sx, sy, qx, qy, batched=False):
                return self._task(sx, sy, qx, qy, loss_fn, steps, first_order, step_weights, batched)

            if vectorize == "vmap":
                outputs = vmap(functools.partial(task_fn, batched=True), randomness="different")(
                    support_x, support_y, query_x, query_y)
            else:
                results = [task_fn(*task) for task in zip(support_x, support_y, query_x, query_y)]
                outputs = (torch.stack(r) for r in zip(*results))
            query_loss, query_output, support_loss, step_scale = outputs
        return TaskBatchResult(query_loss, query_output, support_loss.detach(), step_scale.detach())

    def uses_line_search(self, steps: int) -> bool:
        """Whether an adaptation of ``steps`` inner steps backtracks (see ``line_search``)."""
        return self.line_search == "backtracking" or (self.line_search == "auto" and steps > 1)

    # -- the inner loop, a pure function of the fast-weight dict --------------------------------------
    # Gradients come from torch.autograd on one task at a time (``batched=False``), or from torch.func
    # inside ``vmap`` (``batched=True``), where no Python branch may depend on a tensor's value.

    def _initial_fast_weights(self) -> Params:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.adapted_names}

    def _support_loss(self, fast: Params, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        with float32_under_float16_autocast(x.device.type):
            return loss_fn(self(x, fast), y)

    def _gradient(self, fast: Params, x, y, loss_fn, first_order: bool, batched: bool,
                  loss: Tensor | None = None) -> tuple[Params, Tensor]:
        """∇ of the support loss at ``fast`` (``loss``, if given, is its value with a graph to reuse)."""
        with float32_under_float16_autocast(x.device.type):
            if batched:
                grads, loss = grad_and_value(lambda weights: loss_fn(self(x, weights), y))(fast)
                if first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                return grads, loss
            if loss is None:
                loss = loss_fn(self(x, fast), y)
            # First order: no graph through the gradient (create_graph=False), which also saves memory.
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            return dict(zip(fast, grads)), loss

    def _sgd_step(self, fast: Params, grads: Mapping[str, Tensor], step: int, scale: float = 1.0) -> Params:
        if scale == 1.0:
            return {n: w - self.lr(n, step) * grads[n] for n, w in fast.items()}
        return {n: w - scale * self.lr(n, step) * grads[n] for n, w in fast.items()}

    def _backtracking_step(self, fast: Params, grads: Params, loss: Tensor, step: int, x, y, loss_fn,
                           batched: bool) -> tuple[Params, Tensor, Tensor]:
        """The largest of the steps α⊙∇L · 2^-k, k = 0..max_halvings, that does not raise the support loss.

        Returns the new fast weights, their support loss and the share of the step taken (0: none
        was, the weights stay). One task at a time it stops at the first accepted step; under vmap
        every candidate is scored and the first accepted one selected with ``torch.where``.
        """
        new_fast, new_loss, scale = fast, loss, torch.zeros_like(loss)
        for k in range(self.max_halvings + 1):
            candidate = self._sgd_step(fast, grads, step, 0.5 ** k)
            candidate_loss = self._support_loss(candidate, x, y, loss_fn)
            accept = torch.isfinite(candidate_loss) & (candidate_loss <= loss) & (scale == 0)
            if not batched:
                if accept:  # one task: take it and stop (no graph of a rejected step is kept)
                    return candidate, candidate_loss, torch.full_like(loss, 0.5 ** k)
                continue
            new_fast = {n: torch.where(accept, candidate[n], new_fast[n]) for n in fast}
            new_loss = torch.where(accept, candidate_loss, new_loss)
            scale = torch.where(accept, torch.full_like(scale, 0.5 ** k), scale)
        return new_fast, new_loss, scale

    def _inner_loop(self, x, y, loss_fn, steps: int, first_order: bool, batched: bool,
                    on_step=None) -> tuple[Params, Tensor, Tensor]:
        """``steps`` updates from θ.

        Returns the fast weights, the support losses ``[steps + 1]`` (before each step and after the
        last, detached) and the share of each step taken ``[steps]``.
        """
        search = self.uses_line_search(steps)
        fast = self._initial_fast_weights()
        grads, loss = self._gradient(fast, x, y, loss_fn, first_order, batched)
        losses, scales = [loss.detach()], []
        for step in range(steps):
            if search:
                fast, loss, scale = self._backtracking_step(fast, grads, loss, step, x, y, loss_fn, batched)
            else:
                fast, loss, scale = self._sgd_step(fast, grads, step), None, torch.ones_like(loss)
            if on_step is not None:
                on_step(step, fast)
            if step + 1 < steps:
                if batched or bool(scale > 0) or not search:
                    grads, loss = self._gradient(fast, x, y, loss_fn, first_order, batched, loss)
                # else: one task whose step was refused stays where it was, with the same gradient.
            elif loss is None:  # the support loss after the last step is recorded, never differentiated
                with torch.no_grad():
                    loss = self._support_loss(fast, x, y, loss_fn)
            losses.append(loss.detach())
            scales.append(scale.detach())
        return fast, torch.stack(losses), torch.stack(scales)

    def _task(self, sx, sy, qx, qy, loss_fn, steps, first_order, step_weights, batched):
        """Adapt to one task: query loss (step-weighted if ``step_weights``), query output, support losses, step shares."""
        intermediate: list[Tensor] = []

        def score_intermediate(step: int, fast: Params) -> None:
            if step < steps - 1:
                intermediate.append(loss_fn(self(qx, fast), qy))

        on_step = score_intermediate if step_weights is not None else None
        fast, support_losses, step_scales = self._inner_loop(sx, sy, loss_fn, steps, first_order, batched, on_step)
        query_output = self(qx, fast)
        query_loss = loss_fn(query_output, qy)
        if step_weights is not None:
            query_loss = (step_weights * torch.stack([*intermediate, query_loss])).sum()
        return query_loss, query_output, support_losses, step_scales
