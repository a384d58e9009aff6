"""Meta-SGD, and MAML (its fixed-rate case), trained episodically with Lightning, with manual optimisation.

:class:`MetaSGDLightningModule` learns θ and the inner-loop rates α; :class:`MAMLLightningModule` is
the same recipe with one fixed scalar rate (``learn_lr=False``), under its own name and arguments.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..methods.contract import TaskBatchResult, Vectorize, check_positive_int, check_task_batch
from ..methods.metasgd import LineSearch, MetaSGD, multi_step_loss_weights
from .base import MetaLearningModule, Task, check_positive_or_none

__all__ = ["MAMLLightningModule", "MetaSGDLightningModule"]


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
        channels_last: on CPU, run a network with 2-d convolutions on channels-last images (the same
            results, faster; it turns itself off, with a warning, for a network that cannot take them).
        fast_batch_norm: replace the network's ``nn.BatchNorm2d(track_running_stats=False)`` layers by
            :class:`~metasgd_lightning.methods.fast_paths.TaskBatchNorm2d` holding the same weights: the
            same results, a faster double backward on CPU, and second-order ``vmap``.
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
        >>> import lightning as L
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
        channels_last: bool = True,
        fast_batch_norm: bool = True,
        gradient_clip_val: float | None = None,
        tasks_per_backward: int | None = None,
        lr_meta_lr: float | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(task, vectorize, gradient_clip_val)
        self._save_hyperparameters(inspect.currentframe(), model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self._build(model, init_lr=init_lr, inner_steps=inner_steps, first_order=first_order, learn_lr=learn_lr,
                    per_step_lr=per_step_lr, multi_step_loss=multi_step_loss,
                    multi_step_loss_epochs=multi_step_loss_epochs, first_order_epochs=first_order_epochs,
                    eval_inner_steps=eval_inner_steps, line_search=line_search, max_halvings=max_halvings,
                    tasks_per_backward=tasks_per_backward, lr_meta_lr=lr_meta_lr, optimizer=optimizer,
                    lr_scheduler=lr_scheduler, channels_last=channels_last, fast_batch_norm=fast_batch_norm)

    def _build(self, model: nn.Module, *, init_lr, inner_steps, first_order, learn_lr, per_step_lr, multi_step_loss,
               multi_step_loss_epochs, first_order_epochs, eval_inner_steps, line_search, max_halvings,
               tasks_per_backward, lr_meta_lr, optimizer, lr_scheduler, channels_last, fast_batch_norm) -> None:
        """Check the arguments and build the meta-learner (after ``save_hyperparameters`` of the subclass's own
        signature, so that a checkpoint of :class:`MAMLLightningModule` stores MAML's arguments)."""
        check_positive_int("eval_inner_steps", eval_inner_steps, or_none=True)
        check_positive_int("multi_step_loss_epochs", multi_step_loss_epochs, minimum=0)
        check_positive_int("first_order_epochs", first_order_epochs, minimum=0)
        check_positive_int("tasks_per_backward", tasks_per_backward, or_none=True)
        check_positive_or_none("lr_meta_lr", lr_meta_lr)
        if lr_meta_lr is not None and not learn_lr:
            raise ValueError("`lr_meta_lr` sets the meta learning rate of the learned α, but `learn_lr=False` (MAML) "
                             "learns no α: leave `lr_meta_lr` unset.")
        self.meta_learner = MetaSGD(model, init_lr, inner_steps, first_order, learn_lr, per_step_lr, line_search,
                                    max_halvings, channels_last=channels_last, fast_batch_norm=fast_batch_norm)
        self.multi_step_loss, self.multi_step_loss_epochs = multi_step_loss, multi_step_loss_epochs
        self.first_order_epochs = first_order_epochs
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.tasks_per_backward = tasks_per_backward
        self.lr_meta_lr = lr_meta_lr
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    @property
    def method_name(self) -> str:
        """``"Meta-SGD"``, or ``"MAML"`` when the rate is fixed (``learn_lr=False``); ``"first-order ..."`` without
        the second-order terms."""
        name = "Meta-SGD" if self.meta_learner.learn_lr else "MAML"
        return f"first-order {name}" if self.meta_learner.first_order else name

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


class MAMLLightningModule(MetaSGDLightningModule):
    """MAML trained episodically with Lightning: Meta-SGD's recipe with one fixed inner-loop rate α.

    The inner loop takes plain gradient steps θ' = θ − α ∇θ L_support(θ) with the scalar ``inner_lr``
    α, fixed (only θ is meta-learned); the outer loop backpropagates the query loss through them (second
    order unless ``first_order``). It is :class:`MetaSGDLightningModule` with ``learn_lr=False``: the same
    training step, evaluation, checkpoints and commands, but named MAML and with MAML's arguments only
    (no learned-rate options), and without the line search by default, as the paper's algorithm.

    Args:
        model: the network to meta-learn (e.g. :class:`~metasgd_lightning.methods.models.ConvNet4`).
        task: ``"classification"`` (cross-entropy; integer labels) or ``"regression"`` (MSE).
        inner_lr: the fixed inner-loop rate α (the paper: 0.01 for sine, 0.4 for Omniglot 5-way).
        inner_steps: inner-loop steps in training (the paper: 1 for sine and Omniglot 5-way).
        first_order: first-order MAML: drop the second-order terms of the meta-gradient.
        multi_step_loss: (MAML++) train on the query loss after every inner step, weighted, the
            weights annealed towards the last step over ``multi_step_loss_epochs`` epochs.
        multi_step_loss_epochs: epochs over which the multi-step loss anneals to the last step.
        first_order_epochs: (MAML++ derivative-order annealing) first-order meta-gradients for the
            first this many epochs, then ``first_order``.
        eval_inner_steps: inner-loop steps at validation, test and prediction (default: ``inner_steps``;
            the paper: 10 for sine, 3 for Omniglot).
        line_search: ``"off"`` (default: the paper's plain steps), ``"backtracking"`` (halve a step that
            would raise the task's support loss) or ``"auto"`` (backtrack when adapting several steps).
        max_halvings: how often backtracking halves a step before it refuses it.
        vectorize: ``"vmap"``, ``"loop"`` or ``"auto"``: how the tasks of a meta-batch are adapted.
        channels_last: on CPU, run a network with 2-d convolutions on channels-last images (the same
            results, faster; it turns itself off, with a warning, for a network that cannot take them).
        fast_batch_norm: replace the network's ``nn.BatchNorm2d(track_running_stats=False)`` layers by
            :class:`~metasgd_lightning.methods.fast_paths.TaskBatchNorm2d` holding the same weights: the
            same results, a faster double backward on CPU, and second-order ``vmap``.
        gradient_clip_val: clip the meta-gradient to this total norm (``None``: no clipping).
        tasks_per_backward: backpropagate the meta-loss every this many tasks of a meta-batch (``None``:
            all at once); the meta-gradient is the same, peak memory lower.
        optimizer: the meta-optimiser over θ (Adam with lr 1e-3 by default).
        lr_scheduler: an optional scheduler of the meta learning rate.

    Reference:
        Finn, Abbeel and Levine (2017). Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.

    Example:
        >>> from metasgd_lightning.methods.models import SineMLP
        >>> module = MAMLLightningModule(SineMLP(), task="regression", inner_lr=0.01, eval_inner_steps=10)
        >>> module.method_name, module.inner_lr, module.meta_learner.learn_lr
        ('MAML', 0.01, False)

        In a config, name the class (``metasgd fit --config configs/maml_sine.yaml``)::

            model:
              class_path: metasgd_lightning.MAMLLightningModule
              init_args: {model: {class_path: metasgd_lightning.SineMLP}, inner_lr: 0.01, eval_inner_steps: 10}
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task = "classification",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        multi_step_loss: bool = False,
        multi_step_loss_epochs: int = 10,
        first_order_epochs: int = 0,
        eval_inner_steps: int | None = None,
        line_search: LineSearch = "off",
        max_halvings: int = 5,
        vectorize: Vectorize = "auto",
        channels_last: bool = True,
        fast_batch_norm: bool = True,
        gradient_clip_val: float | None = None,
        tasks_per_backward: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not 0 < inner_lr < math.inf:
            raise ValueError(f"`inner_lr` must be one positive number, MAML's fixed inner-loop rate α; got {inner_lr!r}. "
                             "For learned rates (or a (low, high) range to draw them from) use MetaSGDLightningModule.")
        # MetaLearningModule's __init__, not MetaSGDLightningModule's: that one would store Meta-SGD's arguments.
        super(MetaSGDLightningModule, self).__init__(task, vectorize, gradient_clip_val)
        self._inner_lr = float(inner_lr)
        # MAML's own arguments are the hyperparameters: load_from_checkpoint rebuilds this class from them.
        self._save_hyperparameters(inspect.currentframe(), model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self._build(model, init_lr=float(inner_lr), inner_steps=inner_steps, first_order=first_order, learn_lr=False,
                    per_step_lr=False, multi_step_loss=multi_step_loss, multi_step_loss_epochs=multi_step_loss_epochs,
                    first_order_epochs=first_order_epochs, eval_inner_steps=eval_inner_steps, line_search=line_search,
                    max_halvings=max_halvings, tasks_per_backward=tasks_per_backward, lr_meta_lr=None,
                    optimizer=optimizer, lr_scheduler=lr_scheduler, channels_last=channels_last,
                    fast_batch_norm=fast_batch_norm)

    @property
    def inner_lr(self) -> float:
        """The fixed inner-loop rate α."""
        return self._inner_lr
