"""Reptile trained episodically with Lightning: θ moves towards the weights each task's training reaches."""

from __future__ import annotations

import inspect
import math

import lightning as L  # noqa: F401  (the docstring example uses it)
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ..methods.contract import Vectorize, check_positive_int, check_task_batch
from ..methods.reptile import AdamState, InnerOptimizer, Reptile
from .base import MetaLearningModule, Task

__all__ = ["ReptileLightningModule"]


class ReptileLightningModule(MetaLearningModule):
    """Reptile trained episodically with Lightning: θ moves towards the weights each task's training reaches.

    A training step runs ``inner_steps`` steps of SGD or Adam from θ on every task of the meta-batch
    (on all of its examples: support and query sets together, as Reptile holds nothing out in
    training; the data modules' ``train_queries`` sizes these tasks apart from the test tasks), then
    takes the outer step
    θ ← θ + ε · meanᵢ(θ̃ᵢ − θ) (the paper's Algorithm 2). That step is a gradient step with "gradient"
    θ − mean θ̃ and rate ε: the module hands this gradient to the configured optimiser (plain SGD
    with ε = 1 by default), and ε, the optimiser's learning rate, is annealed linearly to 0 over the
    run, as in the paper. Validation and test adapt on the support set with ``eval_inner_steps`` steps
    of the same inner optimiser and score the query set, as for Meta-SGD.

    The inner Adam state is kept across tasks and meta-steps (``persistent_inner_state``, as the
    paper's code, whose one Adam optimiser is never reset): after each training step it is the mean
    over the meta-batch's tasks of their final moments, its step count advanced by ``inner_steps``
    (:class:`~metasgd_lightning.methods.reptile.Reptile` says why). Evaluation starts each task from a
    copy of it and leaves it as it is. Checkpoints carry it (``reptile_inner_state``), so a resumed run
    takes the steps of one that never stopped and a loaded checkpoint evaluates as it did in training.

    Under DDP each rank trains its share of the meta-batch and DDP averages the gradients: the mean of
    the ranks' means over equal shares is the mean over all tasks, so W devices with meta-batch b take
    the steps of one device with meta-batch W·b (``tests/test_ddp.py``). The kept Adam state is
    averaged across the ranks the same way after each step, so it is the same on every rank.

    The loss of each task's examples after its inner loop (``train/support_loss_after``) costs a
    forward pass per task and only logging reads it: it is computed on the steps Lightning logs
    (every ``log_every_n_steps``) alone. The progress bar shows ``train/support_loss_last_step``, the
    loss of the last inner step's examples before that step, which is free.

    Args:
        model: the network to meta-learn (e.g. :class:`~metasgd_lightning.methods.models.ConvNet4`).
        task: ``"classification"`` (cross-entropy; integer labels) or ``"regression"`` (MSE).
        inner_steps: inner steps per task in training (``k``; the paper: 5 on Omniglot).
        inner_lr: the inner optimiser's learning rate (the paper: Adam 0.001 on Omniglot; SGD 0.02 for sine).
        inner_optimizer: ``"adam"`` (the paper's few-shot classification) or ``"sgd"`` (its sine demo).
        inner_betas: Adam's ``(β1, β2)``; β1 = 0 as in the paper.
        inner_batch_size: examples per inner step in training (``None``: all of a task's examples).
            Each task's mini-batch order is a pure function of the training step and of its place in
            the global meta-batch, the same on any number of devices.
        eval_inner_steps: inner steps at validation, test and prediction (default: ``inner_steps``;
            the paper: 50).
        eval_inner_batch_size: support examples per inner step at evaluation (``None``: all of them).
        persistent_inner_state: keep the inner Adam state across tasks and meta-steps (above); ``False``:
            a fresh state for every task. SGD has no state.
        anneal: anneal ε, the outer optimiser's learning rate, linearly to 0 over the run's training
            steps (``Trainer.estimated_stepping_batches``), the paper's schedule. A given
            ``lr_scheduler`` replaces it.
        vectorize: ``"vmap"`` adapts the tasks of a meta-batch at once, ``"loop"`` one by one,
            ``"auto"`` uses vmap on GPUs and the loop on CPUs.
        channels_last: on CPU, run a network with 2-d convolutions on channels-last images (the same
            results, faster; it turns itself off, with a warning, for a network that cannot take them).
        fast_batch_norm: replace the network's ``nn.BatchNorm2d(track_running_stats=False)`` layers by
            :class:`~metasgd_lightning.methods.fast_paths.TaskBatchNorm2d` holding the same weights: the
            same results, a faster double backward on CPU, and second-order ``vmap``.
        gradient_clip_val: clip θ − mean θ̃ to this total norm before the outer step (``None``: no clipping).
        optimizer: the outer optimiser, given θ − mean θ̃ as θ's gradient. ``None``: plain SGD with
            learning rate ε = 1, the paper's update θ ← θ + ε · mean(θ̃ − θ). Another optimiser (e.g.
            Adam, which the paper mentions as an alternative) takes its learning rate as ε.
        lr_scheduler: a scheduler of ε, stepped after every training step (``ReduceLROnPlateau``
            after every validation, on the monitored metric); replaces ``anneal``.

    Reference:
        Nichol, Achiam and Schulman (2018). On First-Order Meta-Learning Algorithms. arXiv:1803.02999.

    Example:
        >>> from metasgd_lightning.methods.models import SineMLP
        >>> from datamodules import SineDataModule
        >>> module = ReptileLightningModule(SineMLP(), task="regression", inner_optimizer="sgd", inner_lr=0.02,
        ...                                 inner_steps=5, eval_inner_steps=32)
        >>> data = SineDataModule(meta_batch_size=4, val_tasks=8, test_tasks=8)
        >>> import lightning as L
        >>> trainer = L.Trainer(max_steps=2, inference_mode=False, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, data)                    # ε anneals from 1 to 0 over the 2 steps
        >>> sorted(trainer.test(module, data, verbose=False)[0])
        ['test/mse', 'test/mse_ci95']
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task = "classification",
        inner_steps: int = 5,
        inner_lr: float = 1e-3,
        inner_optimizer: InnerOptimizer = "adam",
        inner_betas: tuple[float, float] = (0.0, 0.999),
        inner_batch_size: int | None = None,
        eval_inner_steps: int | None = None,
        eval_inner_batch_size: int | None = None,
        persistent_inner_state: bool = True,
        anneal: bool = True,
        vectorize: Vectorize = "auto",
        channels_last: bool = True,
        fast_batch_norm: bool = True,
        gradient_clip_val: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(task, vectorize, gradient_clip_val)
        check_positive_int("eval_inner_steps", eval_inner_steps, or_none=True)
        check_positive_int("eval_inner_batch_size", eval_inner_batch_size, or_none=True)
        self._save_hyperparameters(inspect.currentframe(), model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.meta_learner = Reptile(model, inner_lr, inner_steps, inner_optimizer, inner_betas,
                                    batch_size=inner_batch_size, persistent_state=persistent_inner_state,
                                    channels_last=channels_last, fast_batch_norm=fast_batch_norm)
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.eval_inner_batch_size = eval_inner_batch_size
        self.anneal = bool(anneal)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    def evaluation_options(self) -> dict[str, object]:
        # No seeds: every task starts its mini-batch order from the same seed, since tasks are adapted
        # independently at evaluation, and the order is then the same on any number of devices.
        return {"batch_size": self.eval_inner_batch_size}

    def training_step(self, batch, batch_idx: int) -> Tensor:
        support_x, support_y, query_x, query_y = check_task_batch(batch)
        self._check_targets(support_y, query_y)
        # Reptile trains on all of a task's examples: no query set is held out in training.
        x, y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
        logged = self._logs_this_step()
        step = self.meta_learner.meta_step(x, y, self.loss_fn, vectorize=self.vectorize, seeds=self._task_seeds(len(x)),
                                           final_loss=logged)
        step.raise_if_not_finite(f"training (global step {self.global_step})")
        self._average_inner_state_across_ranks()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        # The outer update as a gradient: backpropagating Σ ⟨θ, d⟩ with d = θ − mean θ̃ held constant gives
        # θ the gradient d exactly, through Lightning's own path: DDP averages it over the ranks (the mean
        # over all tasks) and a 16-mixed loss scaler scales and unscales it, as for any loss.
        theta = dict(self.meta_learner.model.named_parameters())
        self.manual_backward(sum((theta[name] * d).sum() for name, d in step.direction.items()))
        epsilon = float(optimizer.param_groups[0]["lr"])  # this step's ε, before the scheduler anneals it
        self._optimizer_step(optimizer)
        last = step.support_loss[:, -1].mean()
        after = {} if step.loss_after is None else {"train/support_loss_after": step.loss_after.mean()}
        self._log_training_step(
            len(x), ("train/support_loss_last_step", last),
            # The loss of each task's examples after its inner loop (on logging steps), and before it (on the
            # first step's examples).
            shown=lambda: {"train/support_loss_last_step": last, **after},
            more=lambda: {
                "train/support_loss_before": step.support_loss[:, 0].mean(),
                "train/outer_step_norm": torch.linalg.vector_norm(torch.cat([d.flatten() for d in step.direction.values()])),
                "train/meta_lr": epsilon,
            },
        )
        return last

    def _logs_this_step(self) -> bool:
        """Whether Lightning will write this training step's metrics (asked before the step; the base's
        ``_is_logging_step`` answers after it, when ``global_step`` has counted this batch)."""
        trainer = self.trainer
        every, coming = trainer.log_every_n_steps, self.global_step + 1
        last = (0 < trainer.max_steps <= coming) or (
            trainer.is_last_batch and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1)
        return bool(every) and (coming % every == 0 or last or trainer.should_stop)

    def _average_inner_state_across_ranks(self) -> None:
        """Make the kept Adam state the mean over all ranks' tasks (each rank holds the mean over its equal share)."""
        state = self.meta_learner.inner_state
        if state is None or self.trainer.world_size == 1:
            return
        names = list(state.exp_avg_sq)
        flat = torch.cat([state.exp_avg[n].flatten() for n in names] + [state.exp_avg_sq[n].flatten() for n in names])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        pieces = iter(flat.split([t.numel() for t in [*state.exp_avg.values(), *state.exp_avg_sq.values()]]))
        state.exp_avg = {n: next(pieces).view_as(state.exp_avg[n]) for n in names}
        state.exp_avg_sq = {n: next(pieces).view_as(state.exp_avg_sq[n]) for n in names}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # records the module class
        state = self.meta_learner.inner_state
        if state is not None:  # plain tensors and an int: loadable with weights_only
            checkpoint["reptile_inner_state"] = state.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("reptile_inner_state")
        # A checkpoint from before the state was kept (or without Adam) starts a fresh one.
        self.meta_learner.inner_state = None if saved is None else AdamState.from_state_dict(saved)

    def _task_seeds(self, tasks: int) -> list[int]:
        """The mini-batch seed of each task: a pure function of the step and of the task's place in the global meta-batch.

        Under DDP rank r of W holds tasks r, r + W, … of each global meta-batch (the data modules'
        samplers, and Lightning's DistributedSampler alike), so its task i is task i·W + r there.
        """
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return [(self.global_step << 24) + i * world + rank for i in range(tasks)]

    def _configure_optimizer(self) -> torch.optim.Optimizer:
        theta = [p for p in self.meta_learner.model.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            return torch.optim.SGD(theta, lr=1.0)  # θ − ε (θ − mean θ̃) = θ + ε · mean(θ̃ − θ), ε = 1
        return self.optimizer_factory(theta)

    def _configure_scheduler(self, optimizer: torch.optim.Optimizer):
        if self.lr_scheduler_factory is not None or not self.anneal:
            return super()._configure_scheduler(optimizer)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("`anneal=True` anneals the outer step size to 0 over the run, which needs a finite run: "
                             "set the Trainer's max_steps or max_epochs, or anneal=False.")
        # ε_t = ε (1 − t/T) at step t of T, as the paper's code (meta_step_final = 0).
        return LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
