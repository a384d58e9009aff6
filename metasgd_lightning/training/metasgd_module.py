"""Meta-SGD (and MAML, its fixed-rate case) trained episodically with Lightning, with manual optimisation."""

from __future__ import annotations

import contextlib
import inspect

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..methods.contract import TaskBatchResult, Vectorize, check_positive_int, check_task_batch
from ..methods.metasgd import LineSearch, MetaSGD, multi_step_loss_weights
from .base import MetaLearningModule, Task, check_positive_or_none

__all__ = ["MetaSGDLightningModule"]


class MetaSGDLightningModule(MetaLearningModule):
    """Meta-SGD (or MAML with ``learn_lr=False``) trained episodically with Lightning.

    Args:
        model: the network to meta-learn (e.g. :class:`~metasgd_lightning.methods.models.ConvNet4`).
        task: ``"classification"`` (cross-entropy; integer labels) or ``"regression"`` (MSE).
        init_lr: initial inner-loop rate α: a float, or a ``(low, high)`` uniform range.
        inner_steps: inner-loop steps in training.
        first_order: drop second-order terms of the meta-gradient (α still learns).
        learn_lr: ``False`` gives MAML with the fixed scalar rate ``init_lr``.
        per_step_lr: (MAML++) a separate learned α for each inner step.
        multi_step_loss: (MAML++) train on the query loss after every inner step, weighted, the
            weights annealed towards the last step over ``multi_step_loss_epochs`` epochs.
        multi_step_loss_epochs: epochs over which the multi-step loss anneals to the last step.
        first_order_epochs: (MAML++ derivative-order annealing) first-order meta-gradients for the
            first this many epochs, then ``first_order`` (second order by default).
        eval_inner_steps: inner-loop steps at validation, test and prediction (default: ``inner_steps``).
        line_search: ``"auto"`` (default) backtracks each inner step that would raise the task's
            support loss when an adaptation runs several steps, and takes the paper's plain step
            when it runs one; ``"backtracking"`` always, ``"off"`` never. See :class:`MetaSGD`: with
            several steps, plain steps diverge on the tasks of highest curvature.
        max_halvings: how often backtracking halves a step before it refuses it.
        vectorize: ``"vmap"`` adapts the tasks of a meta-batch at once, ``"loop"`` one by one,
            ``"auto"`` uses vmap on GPUs and the loop on CPUs.
        gradient_clip_val: clip the meta-gradient to this total norm (``None``: no clipping).
        tasks_per_backward: backpropagate the meta-loss every this many tasks of a meta-batch
            (``None``: all at once). Peak memory then holds the graphs of this many tasks instead of
            the whole meta-batch's (ConvNet4, 5-way 1-shot, 32 tasks, second order, CPU: about
            +0.2 GiB with 1 instead of +2.0 GiB); the meta-gradient is the same.
        lr_meta_lr: the meta learning rate of α alone, as a parameter group of its own (``None``: the
            optimiser's, as for θ). α starts far from where it ends (e.g. 0.005–0.1 against a
            useful 0.2–0.5 on Omniglot), so a larger rate for it can pay off.
        optimizer: the meta-optimiser over θ and α (Adam with lr 1e-3 by default).
        lr_scheduler: an optional scheduler of the meta learning rate, stepped after every training
            step (``ReduceLROnPlateau`` after every validation, on the monitored metric).

    Reference:
        Li, Zhou, Chen and Li (2017). Meta-SGD: Learning to Learn Quickly for Few-Shot Learning.

    Example:
        >>> from metasgd_lightning.methods.models import SineMLP
        >>> from datamodules import SineDataModule
        >>> module = MetaSGDLightningModule(SineMLP(), task="regression", init_lr=(0.005, 0.1))
        >>> trainer = L.Trainer(max_steps=2, inference_mode=False, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, SineDataModule(meta_batch_size=4, val_tasks=8))
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task = "classification",
        init_lr: float | tuple[float, float] = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        learn_lr: bool = True,
        per_step_lr: bool = False,
        multi_step_loss: bool = False,
        multi_step_loss_epochs: int = 10,
        first_order_epochs: int = 0,
        eval_inner_steps: int | None = None,
        line_search: LineSearch = "auto",
        max_halvings: int = 5,
        vectorize: Vectorize = "auto",
        gradient_clip_val: float | None = None,
        tasks_per_backward: int | None = None,
        lr_meta_lr: float | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(task, vectorize, gradient_clip_val)
        check_positive_int("eval_inner_steps", eval_inner_steps, or_none=True)
        check_positive_int("multi_step_loss_epochs", multi_step_loss_epochs, minimum=0)
        check_positive_int("first_order_epochs", first_order_epochs, minimum=0)
        check_positive_int("tasks_per_backward", tasks_per_backward, or_none=True)
        check_positive_or_none("lr_meta_lr", lr_meta_lr)
        if lr_meta_lr is not None and not learn_lr:
            raise ValueError("`lr_meta_lr` sets the meta learning rate of the learned α, but `learn_lr=False` (MAML) "
                             "learns no α: leave `lr_meta_lr` unset.")
        self._save_hyperparameters(inspect.currentframe(), model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.meta_learner = MetaSGD(model, init_lr, inner_steps, first_order, learn_lr, per_step_lr, line_search,
                                    max_halvings)
        self.multi_step_loss, self.multi_step_loss_epochs = multi_step_loss, multi_step_loss_epochs
        self.first_order_epochs = first_order_epochs
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.tasks_per_backward = tasks_per_backward
        self.lr_meta_lr = lr_meta_lr
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    # -- the recipe ---------------------------------------------------------------------------------

    def evaluation_options(self) -> dict[str, object]:
        # No meta-gradient is needed at evaluation, and first order gives the same fast weights with less memory.
        return {"first_order": True}

    def training_step(self, batch, batch_idx: int) -> Tensor:
        steps, epoch = self.meta_learner.inner_steps, self.current_epoch
        first_order = True if epoch < self.first_order_epochs else None  # None: the configured order
        step_weights = None
        if self.multi_step_loss:
            step_weights = multi_step_loss_weights(steps, epoch, self.multi_step_loss_epochs).to(self.device)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        result = self._adapt_and_backward(batch, first_order, step_weights)
        meta_loss = result.query_loss.mean()
        self._optimizer_step(optimizer)
        self._log_training_step(
            len(result.query_loss), (f"train/{self.metric_names[0]}", meta_loss.detach()),
            shown=lambda: {f"train/{name}": value.mean() for name, value in self._task_values(result, batch[3]).items()},
            more=lambda: {
                "train/support_loss_before": result.support_loss[:, 0].mean(),
                "train/support_loss_after": result.support_loss[:, -1].mean(),
                # The share of the learned steps α ⊙ ∇L taken (below 1: backtracking shortened steps).
                "train/inner_step_scale": result.step_scale.mean(),
                "train/meta_lr": float(optimizer.param_groups[0]["lr"]),
            },
        )
        return meta_loss.detach()

    def _adapt_and_backward(self, batch, first_order, step_weights) -> TaskBatchResult:
        """Adapt the meta-batch and backpropagate the mean query loss, ``tasks_per_backward`` tasks at a time."""
        batch = check_task_batch(batch)
        self._check_targets(batch[1], batch[3])
        tasks = len(batch[0])
        chunk = min(self.tasks_per_backward or tasks, tasks)
        parts = []
        for start in range(0, tasks, chunk):
            part = [t[start : start + chunk] for t in batch]
            result = self._adapt_checked(part, "training", first_task=start, first_order=first_order,
                                         step_weights=step_weights)
            last = start + chunk >= tasks
            # Under DDP only the last backward all-reduces: the earlier ones accumulate locally.
            with self._no_backward_sync() if not last else contextlib.nullcontext():
                self.manual_backward(result.query_loss.sum() / tasks)
            parts.append((result.query_loss.detach(), result.query_output.detach(), result.support_loss,
                          result.step_scale))
        if len(parts) == 1:
            return TaskBatchResult(*parts[0])
        return TaskBatchResult(*(torch.cat(tensors) for tensors in zip(*parts)))

    def _no_backward_sync(self):
        model = self.trainer.model
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    def _configure_optimizer(self) -> torch.optim.Optimizer:
        theta = [p for p in self.meta_learner.model.parameters() if p.requires_grad]
        alpha = [p for p in self.meta_learner.lrs.parameters() if p.requires_grad]
        if self.lr_meta_lr is None:
            return self.optimizer_factory(theta + alpha)
        return self.optimizer_factory([{"params": theta}, {"params": alpha, "lr": self.lr_meta_lr}])
