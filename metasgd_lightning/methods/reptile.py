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
from torch.optim.adam import adam as adam_in_place
from torch.optim.sgd import sgd as sgd_in_place

from .contract import (
    LossFn,
    MetaLearner,
    Params,
    TaskBatchResult,
    Vectorize,
    check_bool,
    check_positive_int,
    choose_vectorize,
    float32_under_float16_autocast,
    require_autograd,
)

InnerOptimizer = Literal["sgd", "adam"]

__all__ = ["AdamState", "Reptile", "ReptileStep", "sgd_step", "adam_step", "minibatch_indices", "InnerOptimizer"]


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
class AdamState:
    """The inner Adam optimiser's state: the moment estimates and the number of steps taken.

    Attributes:
        step: steps taken so far (the bias corrections of the next step use ``step + 1``).
        exp_avg, exp_avg_sq: the first and second moment estimates ``m`` and ``v`` of every adapted
            parameter (with β1 = 0, ``m`` is the last gradient and only ``v`` carries over).
    """

    step: int
    exp_avg: Params
    exp_avg_sq: Params

    def state_dict(self) -> dict:
        """Plain tensors and an int, loadable with ``torch.load(weights_only=True)``."""
        return {"step": self.step, "exp_avg": dict(self.exp_avg), "exp_avg_sq": dict(self.exp_avg_sq)}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> AdamState:
        return cls(int(state["step"]), dict(state["exp_avg"]), dict(state["exp_avg_sq"]))


@dataclass
class ReptileStep:
    """What the inner loops of one Reptile meta-step give.

    Attributes:
        direction: θ − meanᵢ θ̃ᵢ for every adapted parameter: the outer update is θ ← θ − ε · direction,
            a gradient step with this "gradient" and rate ε.
        support_loss: ``[tasks, steps]`` (detached) the loss of each inner step's examples before that step.
        loss_after: ``[tasks]`` (detached) the loss of all of a task's examples after the last step, or
            ``None`` where it was not asked for (``final_loss=False``: it costs a forward pass per task
            and only logging reads it).
        weights_sum: ``[tasks]`` the sum of each task's adapted weights: not finite where the last
            step diverged (a check that costs no forward pass).
    """

    direction: Params
    support_loss: Tensor
    loss_after: Tensor | None = None
    weights_sum: Tensor | None = None

    def raise_if_not_finite(self, stage: str = "") -> None:
        """Raise :class:`~metasgd_lightning.methods.contract.InnerLoopDivergedError` naming the first non-finite step and task."""
        # TaskBatchResult names the first bad support loss; a zero query loss can never be the culprit.
        tasks, steps = self.support_loss.shape
        last = self.loss_after if self.loss_after is not None else self.weights_sum
        if last is None:
            last = self.support_loss.new_zeros(tasks)
        losses = torch.cat([self.support_loss, last.detach().to(self.support_loss.dtype)[:, None]], 1)
        zeros = self.support_loss.new_zeros(tasks)
        TaskBatchResult(zeros, zeros, losses, zeros.new_ones(tasks, steps)).raise_if_not_finite(stage)


class Reptile(MetaLearner):
    """Reptile: meta-learns a model's initialisation θ from the weights each task's training reaches.

    Each task's inner loop runs ``inner_steps`` steps of ``inner_optimizer`` from θ on the task's
    examples (all of them each step, or mini-batches of ``batch_size``). The outer step moves θ
    towards the mean of the adapted weights (:meth:`meta_step` gives the direction; the caller's
    optimiser takes the step).

    The inner Adam state (``persistent_state``). The paper's code has one Adam optimiser whose moments
    and step count are never reset: only the weights return to θ before each task, so a task's first
    steps are scaled by the squared-gradient average of all the training before it rather than by
    its own first gradient (a fresh Adam's first step is ``lr · sign(g)`` in every entry). Measured on
    Omniglot 5-way 1-shot (1000 meta-steps): 78.10% with a fresh state per task, 85.90% with the kept
    one. The reference runs the tasks of a meta-batch one after another through that optimiser; here
    they run side by side from the same state, and after the meta-step the state is the mean over the
    tasks of their final moments, with the step count advanced by ``inner_steps``: the exponential
    averages of a run whose every step saw the tasks' mean squared gradient, a pure function of the
    meta-batch (not of the order of its tasks), and the same on every device once the means are
    averaged across devices (:class:`~metasgd_lightning.training.ReptileLightningModule` does). As in
    the reference, evaluation and :meth:`adapt` start from a copy of the state and never change it.
    With ``persistent_state=False`` every task starts from a fresh state (zero moments, step 0).

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
        persistent_state: keep the inner Adam state across tasks and meta-steps (above); SGD has none.
        channels_last, fast_batch_norm: the CPU fast paths for any network
            (:class:`~metasgd_lightning.methods.contract.MetaLearner`).

    Reference:
        Nichol, Achiam and Schulman (2018). On First-Order Meta-Learning Algorithms. arXiv:1803.02999.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> reptile = Reptile(torch.nn.Linear(1, 1), inner_lr=0.1, inner_steps=3, inner_optimizer="adam")
        >>> x, y = torch.randn(4, 5, 1), torch.randn(4, 5, 1)      # 4 tasks of 5 examples
        >>> step = reptile.meta_step(x, y, F.mse_loss)
        >>> with torch.no_grad():                                  # θ ← θ − ε (θ − mean θ̃), ε = 1
        ...     for name, p in reptile.model.named_parameters():
        ...         p -= 1.0 * step.direction[name]
        >>> reptile.inner_state.step                               # the kept Adam state moved on by 3 steps
        3
        >>> fast = reptile.adapt(x[0], y[0], F.mse_loss)           # θ̃ of one task, a dict of tensors
        >>> reptile(x[0], fast).shape, reptile.inner_state.step    # adapting used a copy of the state
        (torch.Size([5, 1]), 3)
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
        persistent_state: bool = True,
        *,
        channels_last: bool = True,
        fast_batch_norm: bool = True,
    ) -> None:
        super().__init__(model, inner_steps, channels_last=channels_last, fast_batch_norm=fast_batch_norm)
        self.batch_size = check_positive_int("batch_size", batch_size, or_none=True)
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"`inner_optimizer` must be 'sgd' or 'adam'; got {inner_optimizer!r}.")
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not (math.isfinite(inner_lr) and inner_lr > 0):
            raise ValueError(f"`inner_lr` must be a positive number; got {inner_lr!r}.")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1); got {betas!r}.")
        check_bool("persistent_state", persistent_state)
        self.inner_lr, self.inner_optimizer = float(inner_lr), inner_optimizer
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.persistent_state = persistent_state and inner_optimizer == "adam"
        #: The kept inner Adam state (``None``: fresh, zero moments at step 0). Not a buffer: checkpoints
        #: carry it beside the state dict (``ReptileLightningModule.on_save_checkpoint``), so that
        #: checkpoints without it still load.
        self.inner_state: AdamState | None = None

    # -- what callers use -----------------------------------------------------------------------------

    def meta_step(self, x: Tensor, y: Tensor, loss_fn: LossFn, *, steps: int | None = None, vectorize: Vectorize = "auto",
                  seeds: Sequence[int] | None = None, final_loss: bool = True) -> ReptileStep:
        """Train a copy of θ on each task and return the outer direction θ − mean θ̃.

        With ``persistent_state`` the kept Adam state becomes the tasks' mean final state (see the class).

        Args:
            x, y: ``[tasks, examples, ...]`` each task's training examples and targets.
            loss_fn: ``loss_fn(outputs, targets)``, a scalar.
            steps: inner steps (default ``inner_steps``).
            vectorize: ``"vmap"`` trains all tasks at once with ``torch.func.vmap``, ``"loop"`` one after
                another, ``"auto"`` vmap on GPUs and the loop elsewhere.
            seeds: one seed per task for its mini-batch order (default: 0 for every task); unused
                without ``batch_size``.
            final_loss: also compute each task's loss on all of its examples after the last step
                (``ReptileStep.loss_after``; a forward pass per task that only logging reads).

        Returns:
            A :class:`ReptileStep`; call its ``raise_if_not_finite()`` to catch divergence.
        """
        fast, support_loss, loss_after, state = self._adapt_tasks(x, y, steps, vectorize, seeds, self.batch_size,
                                                                  loss_fn, final_loss=final_loss, mean_state=True)
        theta = dict(self.model.named_parameters())
        direction = {n: theta[n].detach() - w.mean(0) for n, w in fast.items()}
        weights_sum = sum(w.detach().flatten(1).sum(1) for w in fast.values())
        if self.persistent_state:
            self.inner_state = state
        return ReptileStep(direction, support_loss, loss_after, weights_sum)

    def adapt(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn, *, steps: int | None = None,
              batch_size: int | None = None, seed: int = 0) -> Params:
        """Adapt to one task: ``steps`` inner steps on its support set from θ (and a copy of the kept state).

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
        fast, support_loss, loss_after, _ = self._adapt_tasks(support_x[None], support_y[None], steps, "loop", [seed],
                                                              batch_size, loss_fn)
        ReptileStep(fast, support_loss, loss_after).raise_if_not_finite()
        return self._with_frozen({n: w[0] for n, w in fast.items()})

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_fn: LossFn, *,
                    steps: int | None = None, vectorize: Vectorize = "auto", batch_size: int | None = None,
                    seeds: Sequence[int] | None = None) -> TaskBatchResult:
        """Adapt to each task of a meta-batch on its support set and score its query set (evaluation).

        Every tensor has a leading task dimension; ``batch_size`` is the examples per inner step
        (default: all of the support set). Each task starts from θ and a copy of the kept Adam state,
        which stays as it is. Returns a :class:`~metasgd_lightning.methods.contract.TaskBatchResult`
        (detached: no meta-gradient) whose ``step_scale`` is all ones (every step is taken in full).
        """
        fast, support_loss, loss_after, _ = self._adapt_tasks(support_x, support_y, steps, vectorize, seeds,
                                                              batch_size, loss_fn)
        with torch.no_grad():
            if choose_vectorize(vectorize, support_x.device) == "vmap":
                query_output = vmap(self.forward, randomness="different")(query_x, fast)
                query_loss = vmap(loss_fn)(query_output, query_y)
            else:
                query_output = torch.stack([self(qx, {n: w[t] for n, w in fast.items()}) for t, qx in enumerate(query_x)])
                query_loss = torch.stack([loss_fn(out, qy) for out, qy in zip(query_output, query_y)])
        support_loss = torch.cat([support_loss, loss_after[:, None]], 1)
        step_scale = support_loss.new_ones(support_loss.shape[0], support_loss.shape[1] - 1)
        return TaskBatchResult(query_loss, query_output, support_loss, step_scale)

    def reset_inner_state(self) -> None:
        """Forget the kept inner Adam state: the next task starts with zero moments at step 0."""
        self.inner_state = None

    # -- the inner loop ---------------------------------------------------------------------------------

    def _start_state(self, like: Params) -> AdamState:
        """The state each task starts from: the kept one (on ``like``'s device and dtype), or a fresh one."""
        kept = self.inner_state if self.persistent_state else None
        if kept is None:
            zeros = {n: torch.zeros_like(w) for n, w in like.items()}
            return AdamState(0, zeros, {n: torch.zeros_like(w) for n, w in like.items()})
        cast = lambda moments: {n: moments[n].to(like[n]) for n in like}  # noqa: E731  (a moved or cast model)
        return AdamState(kept.step, cast(kept.exp_avg), cast(kept.exp_avg_sq))

    def _adapt_tasks(self, x: Tensor, y: Tensor, steps: int | None, vectorize: Vectorize,
                     seeds: Sequence[int] | None, batch_size: int | None, loss_fn: LossFn, *,
                     final_loss: bool = True, mean_state: bool = False) -> tuple[Params, Tensor, Tensor | None, AdamState | None]:
        """θ̃ of every task stacked ``[tasks, ...]``, the losses before each step ``[tasks, steps]``, the
        losses after the last step ``[tasks]`` (``None`` without ``final_loss``) and, with ``mean_state``
        and Adam, the tasks' mean final Adam state."""
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
        theta = dict(self.model.named_parameters())
        # θ detached: the inner loop is plain training; no graph reaches θ (Reptile needs no meta-gradient).
        theta = {n: theta[n].detach() for n in self.adapted_names}
        adam = self.inner_optimizer == "adam"
        start = self._start_state(theta) if adam else None
        mean = None
        with torch.enable_grad():
            if vectorize == "vmap":
                inner_loop = functools.partial(self._inner_loop_vmapped, theta=theta, start=start, loss_fn=loss_fn,
                                               final_loss=final_loss)
                fast, losses, after, moments = vmap(inner_loop, randomness="different")(x_steps, y_steps, x, y)
                if adam and mean_state:
                    mean = AdamState(start.step + steps, {n: m.mean(0) for n, m in moments[0].items()},
                                     {n: v.mean(0) for n, v in moments[1].items()})
            else:
                fast, losses, after = {n: [] for n in self.adapted_names}, [], []
                totals = None
                for task in zip(x_steps, y_steps, x, y):
                    weights, loss, loss_after, moments = self._inner_loop(*task, theta, start, loss_fn, final_loss)
                    for n in self.adapted_names:
                        fast[n].append(weights[n])
                    losses.append(loss)
                    after.append(loss_after)
                    if adam and mean_state:  # running sums of the final moments, for their mean
                        if totals is None:
                            totals = moments
                        else:
                            for total, moment in zip(totals[0] + totals[1], moments[0] + moments[1]):
                                total.add_(moment)
                fast = {n: torch.stack(w) for n, w in fast.items()}
                losses = torch.stack(losses)
                after = torch.stack(after) if final_loss else None
                if totals is not None:
                    for total in totals[0] + totals[1]:
                        total.div_(tasks)
                    names = self.adapted_names
                    mean = AdamState(start.step + steps, dict(zip(names, totals[0])), dict(zip(names, totals[1])))
        if vectorize == "vmap" and not final_loss:
            after = None
        return fast, losses.detach(), None if after is None else after.detach(), mean

    def _inner_loop(self, x_steps: Tensor, y_steps: Tensor, x: Tensor, y: Tensor, theta: Params, start: AdamState | None,
                    loss_fn: LossFn, final_loss: bool) -> tuple[Params, Tensor, Tensor | None, tuple[list, list] | None]:
        """One task, the loop path: ``len(x_steps)`` optimiser steps from θ, step ``s`` on ``x_steps[s]``.

        The weights and Adam moments are updated in place, with torch's own foreach Adam
        (``torch.optim.adam.adam``, the function behind ``torch.optim.Adam``): no new tensors per step.

        Returns θ̃, the losses ``[steps]`` of each step's examples before the step, the loss of all the
        task's examples ``x`` after the last step (``None`` without ``final_loss``) and, with Adam, the
        final moments (lists in the order of ``adapted_names``).
        """
        names = self.adapted_names
        weights = [theta[n].clone().requires_grad_() for n in names]
        adam = start is not None
        if adam:
            exp_avgs = [start.exp_avg[n].clone() for n in names]
            exp_avg_sqs = [start.exp_avg_sq[n].clone() for n in names]
            # One step tensor per parameter, as torch.optim.Adam keeps them (CPU floats: not capturable).
            state_steps = [torch.tensor(float(start.step)) for _ in names]
        losses = []
        # The inner gradient is taken outside any loss scaler: under float16 autocast it runs in float32.
        with float32_under_float16_autocast(x.device.type):
            for bx, by in zip(x_steps, y_steps):
                loss = loss_fn(self(bx, dict(zip(names, weights))), by)
                grads = torch.autograd.grad(loss, weights)
                losses.append(loss.detach())
                with torch.no_grad():
                    if adam:
                        adam_in_place(weights, list(grads), exp_avgs, exp_avg_sqs, [], state_steps, foreach=True,
                                      amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=self.inner_lr,
                                      weight_decay=0.0, eps=self.eps, maximize=False)
                    else:
                        sgd_in_place(weights, list(grads), [None] * len(weights), foreach=True, weight_decay=0.0,
                                     momentum=0.0, lr=self.inner_lr, dampening=0.0, nesterov=False, maximize=False)
            fast = {n: w.detach() for n, w in zip(names, weights)}
            after = None
            if final_loss:
                with torch.no_grad():
                    after = loss_fn(self(x, fast), y)
        return fast, torch.stack(losses), after, (exp_avgs, exp_avg_sqs) if adam else None

    def _inner_loop_vmapped(self, x_steps: Tensor, y_steps: Tensor, x: Tensor, y: Tensor, *, theta: Params,
                            start: AdamState | None, loss_fn: LossFn, final_loss: bool):
        """One task inside ``vmap``: the pure-function inner loop (torch.func), as :meth:`_inner_loop`."""
        fast = dict(theta)
        moments = (start.exp_avg, start.exp_avg_sq) if start is not None else None
        losses = []
        with float32_under_float16_autocast(x.device.type):
            for step, (bx, by) in enumerate(zip(x_steps, y_steps)):
                grads, loss = grad_and_value(lambda weights, bx=bx, by=by: loss_fn(self(bx, weights), by))(fast)
                losses.append(loss)
                if moments is not None:
                    fast, moments = adam_step(fast, grads, moments, start.step + step + 1, self.inner_lr, self.betas,
                                              self.eps)
                else:
                    fast = sgd_step(fast, grads, self.inner_lr)
            with torch.no_grad():
                # vmap needs a tensor out: a zero stands in for the loss that was not asked for.
                after = loss_fn(self(x, fast), y) if final_loss else losses[-1].new_zeros(())
        return fast, torch.stack(losses), after, moments if moments is not None else ({}, {})
