"""Reptile: meta-learn an initialisation θ by moving it towards the weights trained on each task.

For every task of a meta-batch, ``k`` steps of SGD or Adam from θ on the task's data give θ̃ᵢ; the
outer update is θ ← θ + ε · meanᵢ(θ̃ᵢ − θ) (the batched version, Algorithm 2 of the paper). Nothing is
differentiated through the inner loop, so Reptile is first order by construction and learns no rate:
only θ. The inner loop is a pure function of a parameter dict, run with
``torch.func.functional_call``: no module is cloned and θ itself is never written to. This module holds
the maths only (no Lightning); :class:`~metasgd_lightning.training.ReptileLightningModule` trains it.

How Reptile differs from the package's other methods (Meta-SGD, and MAML with ``learn_lr=False``):

======================  ===========================  ======================================  ===========================
                        learns                       inner loop                              meta-gradient costs
======================  ===========================  ======================================  ===========================
MAML                    θ                            k SGD steps with a fixed rate α         a backward through k steps
Meta-SGD                θ and a rate α per entry     k steps θ − α ⊙ ∇L (α learned)          a backward through k steps
Reptile                 θ                            k steps of SGD or Adam, own data order  none: θ − mean θ̃ is the step
======================  ===========================  ======================================  ===========================

With ``k = 1`` step of plain SGD, θ − θ̃ᵢ = α∇Lᵢ(θ), so Reptile is a gradient step on the tasks' mean
loss ("joint training"); with ``k > 1`` the update also contains the terms that make it a
meta-learner (Sec. 5 of the paper): ``tests/test_reptile.py`` checks both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from .contract import (
    LossFn,
    MetaLearner,
    Params,
    TaskBatchResult,
    Vectorize,
    check_positive_int,
    choose_vectorize,
    float32_under_float16_autocast,
    require_autograd,
)

InnerOptimizer = Literal["sgd", "adam"]

__all__ = ["Reptile", "ReptileStep", "sgd_step", "adam_step", "minibatch_indices", "InnerOptimizer"]


def sgd_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: float) -> Params:
    """One step of plain SGD: ``params − lr · grads``, as new tensors."""
    return {n: w - lr * grads[n] for n, w in params.items()}


def adam_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], moments: tuple[Params, Params], step: int,
              lr: float, betas: tuple[float, float], eps: float) -> tuple[Params, tuple[Params, Params]]:
    """One step of Adam, exactly ``torch.optim.Adam``'s update, as a pure function.

    Args:
        params, grads: the weights and their gradients.
        moments: the first and second moment estimates ``(m, v)`` before this step (zeros before the first).
        step: the number of this step, counted from 1 (for the bias corrections).
        lr, betas, eps: Adam's settings (Reptile's few-shot experiments use ``betas=(0, 0.999)``).

    Returns:
        The new weights and the new moments.
    """
    beta1, beta2 = betas
    m = {n: beta1 * moments[0][n] + (1 - beta1) * g for n, g in grads.items()}
    v = {n: beta2 * moments[1][n] + (1 - beta2) * g * g for n, g in grads.items()}
    # torch.optim.Adam's arithmetic, term for term: lr / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps).
    step_size, root_correction = lr / (1 - beta1**step), math.sqrt(1 - beta2**step)
    new = {n: w - step_size * m[n] / (v[n].sqrt() / root_correction + eps) for n, w in params.items()}
    return new, (m, v)


def minibatch_indices(examples: int, batch_size: int, steps: int, seed: int) -> Tensor:
    """The examples of each inner step: ``[steps, batch_size]`` indices into a task's ``examples``.

    The examples are shuffled and taken ``batch_size`` at a time; when they run out they are shuffled
    again (a batch may straddle two passes), as the paper's code draws its inner mini-batches. The
    order is a pure function of ``seed``.

    Example:
        >>> minibatch_indices(examples=4, batch_size=2, steps=3, seed=0).shape
        torch.Size([3, 2])
    """
    generator = torch.Generator().manual_seed(seed)
    passes = math.ceil(steps * batch_size / examples)
    order = torch.cat([torch.randperm(examples, generator=generator) for _ in range(passes)])
    return order[: steps * batch_size].view(steps, batch_size)


@dataclass
class ReptileStep:
    """What the inner loops of one Reptile meta-step give.

    Attributes:
        direction: θ − meanᵢ θ̃ᵢ for every adapted parameter: the outer update is θ ← θ − ε · direction,
            a gradient step with this "gradient" and rate ε.
        support_loss: ``[tasks, steps + 1]`` (detached) the loss of each inner step's examples before
            that step, and of all the task's examples after the last step.
    """

    direction: Params
    support_loss: Tensor

    def raise_if_not_finite(self, stage: str = "") -> None:
        """Raise :class:`~metasgd_lightning.methods.metasgd.InnerLoopDivergedError` naming the first non-finite step and task."""
        # TaskBatchResult names the first bad support loss; a zero query loss can never be the culprit.
        tasks, steps = self.support_loss.shape[0], self.support_loss.shape[1] - 1
        zeros = self.support_loss.new_zeros(tasks)
        TaskBatchResult(zeros, zeros, self.support_loss, zeros.new_ones(tasks, steps)).raise_if_not_finite(stage)


class Reptile(MetaLearner):
    """Reptile: meta-learns a model's initialisation θ from the weights each task's training reaches.

    Each task's inner loop runs ``inner_steps`` steps of ``inner_optimizer`` from θ on the task's
    examples (all of them each step, or mini-batches of ``batch_size``), with a fresh optimiser state
    per task. The outer step moves θ towards the mean of the adapted weights (:meth:`meta_step` gives
    the direction; the caller's optimiser takes the step).

    Args:
        model: the network; its trainable parameters are θ. Parameters with ``requires_grad=False``
            are used as they are and not adapted.
        inner_lr: the inner optimiser's learning rate.
        inner_steps: inner steps of :meth:`meta_step` and :meth:`adapt` by default (``k``).
        inner_optimizer: ``"sgd"`` (plain SGD, the paper's sine demo) or ``"adam"`` (the paper's few-shot
            classification experiments, with ``betas=(0, 0.999)``).
        betas: Adam's ``(β1, β2)``; β1 = 0 as in the paper: no momentum carried across a task's few steps.
        eps: Adam's ε.
        batch_size: examples per inner step (``None``, or at least the task's examples: all of them).

    Reference:
        Nichol, Achiam and Schulman (2018). On First-Order Meta-Learning Algorithms. arXiv:1803.02999.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> reptile = Reptile(torch.nn.Linear(1, 1), inner_lr=0.1, inner_steps=3, inner_optimizer="sgd")
        >>> x, y = torch.randn(4, 5, 1), torch.randn(4, 5, 1)      # 4 tasks of 5 examples
        >>> step = reptile.meta_step(x, y, F.mse_loss)
        >>> with torch.no_grad():                                  # θ ← θ − ε (θ − mean θ̃), ε = 1
        ...     for name, p in reptile.model.named_parameters():
        ...         p -= 1.0 * step.direction[name]
        >>> fast = reptile.adapt(x[0], y[0], F.mse_loss)           # θ̃ of one task, a dict of tensors
        >>> reptile(x[0], fast).shape
        torch.Size([5, 1])
    """

    # Reptile learns no inner-loop rate (Meta-SGD's α): LearnedRateMonitor reads this and logs nothing.
    learn_lr = False

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        inner_optimizer: InnerOptimizer = "adam",
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, inner_steps)
        self.batch_size = check_positive_int("batch_size", batch_size, or_none=True)
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"`inner_optimizer` must be 'sgd' or 'adam'; got {inner_optimizer!r}.")
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not (math.isfinite(inner_lr) and inner_lr > 0):
            raise ValueError(f"`inner_lr` must be a positive number; got {inner_lr!r}.")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1); got {betas!r}.")
        self.inner_lr, self.inner_optimizer = float(inner_lr), inner_optimizer
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    # -- what callers use -----------------------------------------------------------------------------

    def meta_step(self, x: Tensor, y: Tensor, loss_fn: LossFn, *, steps: int | None = None, vectorize: Vectorize = "auto",
                  seeds: Sequence[int] | None = None) -> ReptileStep:
        """Train a copy of θ on each task and return the outer direction θ − mean θ̃.

        Args:
            x, y: ``[tasks, examples, ...]`` each task's training examples and targets.
            loss_fn: ``loss_fn(outputs, targets)``, a scalar.
            steps: inner steps (default ``inner_steps``).
            vectorize: ``"vmap"`` trains all tasks at once with ``torch.func.vmap``, ``"loop"`` one after
                another, ``"auto"`` vmap on GPUs and the loop elsewhere.
            seeds: one seed per task for its mini-batch order (default: 0 for every task); unused
                without ``batch_size``.

        Returns:
            A :class:`ReptileStep`; call its ``raise_if_not_finite()`` to catch divergence.
        """
        fast, support_loss = self._adapt_tasks(x, y, steps, vectorize, seeds, self.batch_size, loss_fn)
        theta = dict(self.model.named_parameters())
        direction = {n: theta[n].detach() - w.mean(0) for n, w in fast.items()}
        return ReptileStep(direction, support_loss)

    def adapt(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn, *, steps: int | None = None,
              batch_size: int | None = None, seed: int = 0) -> Params:
        """Adapt to one task: ``steps`` inner steps on its support set from θ.

        Args:
            support_x, support_y: the task's support inputs and targets, ``[examples, ...]``.
            loss_fn: ``loss_fn(outputs, targets)``, a scalar.
            steps: inner steps (default ``inner_steps``).
            batch_size: examples per step (default: all of them).
            seed: the mini-batch order, with ``batch_size``.

        Returns:
            θ̃, a dict from parameter name to (detached) tensor for :meth:`forward`; frozen parameters
            appear unchanged.

        Raises:
            InnerLoopDivergedError: a loss of the inner loop became NaN or infinite (the step is named).
        """
        fast, support_loss = self._adapt_tasks(support_x[None], support_y[None], steps, "loop", [seed], batch_size,
                                               loss_fn)
        ReptileStep(fast, support_loss).raise_if_not_finite()
        return self._with_frozen({n: w[0] for n, w in fast.items()})

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_fn: LossFn, *,
                    steps: int | None = None, vectorize: Vectorize = "auto", batch_size: int | None = None,
                    seeds: Sequence[int] | None = None) -> TaskBatchResult:
        """Adapt to each task of a meta-batch on its support set and score its query set (evaluation).

        Every tensor has a leading task dimension; ``batch_size`` is the examples per inner step
        (default: all of the support set). Returns a
        :class:`~metasgd_lightning.methods.metasgd.TaskBatchResult` (detached: no meta-gradient) whose
        ``step_scale`` is all ones (every step is taken in full).
        """
        fast, support_loss = self._adapt_tasks(support_x, support_y, steps, vectorize, seeds, batch_size, loss_fn)
        with torch.no_grad():
            if choose_vectorize(vectorize, support_x.device) == "vmap":
                query_output = vmap(self.forward, randomness="different")(query_x, fast)
                query_loss = vmap(loss_fn)(query_output, query_y)
            else:
                query_output = torch.stack([self(qx, {n: w[t] for n, w in fast.items()}) for t, qx in enumerate(query_x)])
                query_loss = torch.stack([loss_fn(out, qy) for out, qy in zip(query_output, query_y)])
        step_scale = support_loss.new_ones(support_loss.shape[0], support_loss.shape[1] - 1)
        return TaskBatchResult(query_loss, query_output, support_loss, step_scale)

    # -- the inner loop, a pure function of the fast-weight dict --------------------------------------

    def _adapt_tasks(self, x: Tensor, y: Tensor, steps: int | None, vectorize: Vectorize,
                     seeds: Sequence[int] | None, batch_size: int | None, loss_fn: LossFn) -> tuple[Params, Tensor]:
        """θ̃ of every task, stacked ``[tasks, ...]``, and the support losses ``[tasks, steps + 1]``."""
        steps = self._steps(steps)
        vectorize = choose_vectorize(vectorize, x.device)
        tasks, examples = x.shape[0], x.shape[1]
        if seeds is not None and len(seeds) != tasks:
            raise ValueError(f"`seeds` must hold one seed per task ({tasks}); got {len(seeds)}.")
        if batch_size is None or batch_size >= examples:
            # Every step sees all of the task's examples: a view, not a copy.
            x_steps = x.unsqueeze(1).expand(tasks, steps, *x.shape[1:])
            y_steps = y.unsqueeze(1).expand(tasks, steps, *y.shape[1:])
        else:
            index = torch.stack([minibatch_indices(examples, batch_size, steps, seed) for seed in (seeds or [0] * tasks)])
            index = index.to(x.device)
            rows = torch.arange(tasks, device=x.device)[:, None, None]
            x_steps, y_steps = x[rows, index], y[rows, index]
        require_autograd()
        with torch.enable_grad():
            if vectorize == "vmap":
                inner_loop = functools.partial(self._inner_loop, loss_fn=loss_fn, batched=True)
                fast, losses = vmap(inner_loop, randomness="different")(x_steps, y_steps, x, y)
            else:
                results = [self._inner_loop(*task, loss_fn, False) for task in zip(x_steps, y_steps, x, y)]
                fast = {n: torch.stack([r[0][n] for r in results]) for n in self.adapted_names}
                losses = torch.stack([r[1] for r in results])
        return fast, losses.detach()

    def _inner_loop(self, x_steps: Tensor, y_steps: Tensor, x: Tensor, y: Tensor, loss_fn: LossFn,
                    batched: bool) -> tuple[Params, Tensor]:
        """One task: ``len(x_steps)`` optimiser steps from θ, step ``s`` on ``x_steps[s]``.

        Returns θ̃ and the losses ``[steps + 1]``: of each step's examples before the step, and of all
        the task's examples ``x`` after the last step.
        """
        params = dict(self.model.named_parameters())
        # θ detached: the inner loop is plain training; no graph reaches θ (Reptile needs no meta-gradient).
        fast = {n: params[n].detach() for n in self.adapted_names}
        moments = ({n: torch.zeros_like(w) for n, w in fast.items()}, {n: torch.zeros_like(w) for n, w in fast.items()})
        losses = []
        # The inner gradient is taken outside any loss scaler: under float16 autocast it runs in float32.
        with float32_under_float16_autocast(x.device.type):
            for step, (bx, by) in enumerate(zip(x_steps, y_steps)):
                grads, loss = self._gradient(fast, bx, by, loss_fn, batched)
                losses.append(loss)
                if self.inner_optimizer == "adam":
                    fast, moments = adam_step(fast, grads, moments, step + 1, self.inner_lr, self.betas, self.eps)
                else:
                    fast = sgd_step(fast, grads, self.inner_lr)
            with torch.no_grad():
                losses.append(loss_fn(self(x, fast), y))
        return fast, torch.stack(losses)

    def _gradient(self, fast: Params, x: Tensor, y: Tensor, loss_fn: LossFn, batched: bool) -> tuple[Params, Tensor]:
        """∇ of the loss at ``fast`` and its value, both without a graph."""
        if batched:  # inside vmap: torch.func
            return grad_and_value(lambda weights: loss_fn(self(x, weights), y))(fast)
        # One task at a time torch.autograd is faster, and lets TaskBatchNorm2d use torch's fused kernel.
        leaves = {n: w.detach().requires_grad_() for n, w in fast.items()}
        loss = loss_fn(self(x, leaves), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return dict(zip(leaves, grads)), loss.detach()

