"""The training recipes: Meta-SGD and Reptile as LightningModules with manual optimisation.

Each batch is a meta-batch of tasks ``(support_x, support_y, query_x, query_y)`` with a leading task
dimension. :class:`MetaLearningModule` holds what the methods share: validation and test adapt each
task on its support set and score its query set (per-task metrics with 95% intervals), logging,
throughput, checkpoints that load with ``weights_only``, prediction. Evaluation adapts with gradients,
so the Trainer must run with ``inference_mode=False`` (the configs and the ``metasgd`` CLI set it).

- :class:`MetaSGDLightningModule`: a training step adapts every task on its support set (the inner
  loop), averages the query losses of the adapted weights (the meta-loss), backpropagates into θ and
  α, and steps the optimiser.
- :class:`ReptileLightningModule`: a training step trains a copy of θ on each task's examples and
  moves θ towards the mean of the trained weights; no meta-gradient is taken.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from .metasgd import (
    InnerLoopDivergedError,
    LineSearch,
    MetaSGD,
    TaskBatchResult,
    Vectorize,
    check_positive_int,
    check_task_batch,
    multi_step_loss_weights,
)
from .metrics import TaskMeanCI, task_accuracy
from .reptile import InnerOptimizer, Reptile

__all__ = ["MetaLearningModule", "MetaSGDLightningModule", "ReptileLightningModule"]

Task = Literal["classification", "regression"]


def _regression_loss(output: Tensor, target: Tensor) -> Tensor:
    if output.shape != target.shape:
        raise ValueError(
            f"Regression outputs and targets must have the same shape; the model gave {tuple(output.shape)} "
            f"for targets of shape {tuple(target.shape)}. Match the model's `out_features` to the targets."
        )
    return F.mse_loss(output, target)


_NOT_A_CONFIG = object()


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _as_config(obj: object) -> object:
    """``{"class_path", "init_args"}`` for a model with recorded ``init_args``, a class or a partial of one."""
    if obj is None:
        return None
    if isinstance(obj, nn.Module):
        init_args = getattr(obj, "init_args", None)
        return {"class_path": _class_path(type(obj)), "init_args": dict(init_args)} if isinstance(init_args, dict) else _NOT_A_CONFIG
    if isinstance(obj, type):
        return {"class_path": _class_path(obj)}
    if isinstance(obj, functools.partial) and isinstance(obj.func, type) and not obj.args:
        return {"class_path": _class_path(obj.func), "init_args": dict(obj.keywords)}
    return _NOT_A_CONFIG


def _check_positive_or_none(name: str, value: object) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"`{name}` must be a positive number or None; got {value!r}.")


class MetaLearningModule(L.LightningModule):
    """What the package's meta-learning recipes share; subclass it for a method of your own.

    Validation, test and prediction adapt each task on its support set with ``eval_inner_steps``
    inner steps and score (or predict) its query set; metrics are per-task means with their 95%
    confidence interval (:class:`~metasgd_lightning.metrics.TaskMeanCI`, synchronised across devices),
    ``val/acc`` or ``val/mse`` is the monitored metric, training-step scalars are logged where
    Lightning writes them, with tasks per second. Optimisation is manual: a subclass's
    ``training_step`` calls ``manual_backward`` and :meth:`_optimizer_step`.

    A subclass calls ``super().__init__(task, vectorize, gradient_clip_val)``, then
    :meth:`_save_hyperparameters`, and sets:

    - ``self.meta_learner``: an ``nn.Module`` with ``model`` (the network), ``forward(x, params)``,
      ``adapt(support_x, support_y, loss_fn, steps, *options)`` (one task's fast weights) and
      ``adapt_tasks(support_x, support_y, query_x, query_y, loss_fn, steps, vectorize, *options)``
      (a :class:`~metasgd_lightning.metasgd.TaskBatchResult`), as :class:`~metasgd_lightning.MetaSGD`
      and :class:`~metasgd_lightning.reptile.Reptile` have;
    - ``self.eval_inner_steps``, ``self.optimizer_factory`` and ``self.lr_scheduler_factory``;

    and may override :meth:`_evaluation_options` (the ``options`` above at evaluation, in order),
    :meth:`_configure_optimizer` and :meth:`_configure_scheduler`.

    Args:
        task: ``"classification"`` (cross-entropy; integer labels) or ``"regression"`` (MSE).
        vectorize: ``"vmap"``, ``"loop"`` or ``"auto"``: how the tasks of a meta-batch are adapted.
        gradient_clip_val: clip the (meta-)gradient to this total norm (``None``: no clipping).
    """

    def __init__(self, task: Task = "classification", vectorize: Vectorize = "auto",
                 gradient_clip_val: float | None = None) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"`task` must be 'classification' or 'regression'; got {task!r}.")
        if vectorize not in ("auto", "loop", "vmap"):
            raise ValueError(f"`vectorize` must be 'auto', 'loop' or 'vmap'; got {vectorize!r}.")
        _check_positive_or_none("gradient_clip_val", gradient_clip_val)
        self.automatic_optimization = False
        self.task, self.vectorize, self.gradient_clip_val = task, vectorize, gradient_clip_val
        self.loss_fn = F.cross_entropy if task == "classification" else _regression_loss
        self.metric_names = ("loss", "acc") if task == "classification" else ("mse",)
        # One TaskMeanCI per (stage, metric): values per task, synchronised across devices.
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleDict({name: TaskMeanCI(keep_values=stage == "test") for name in self.metric_names})
            for stage in ("val", "test")
        })
        self.test_results: dict[str, dict[str, Tensor]] = {}
        self._last_log_time: float | None = None  # for tasks per second between logged steps
        self._tasks_since_log = 0
        self.last_validated_step: int | None = None  # global step of the last full validation

    @property
    def monitor(self) -> tuple[str, Literal["min", "max"]]:
        """The validation metric that picks the best checkpoint, and whether higher or lower is better."""
        return ("val/acc", "max") if self.task == "classification" else ("val/mse", "min")

    @property
    def model(self) -> nn.Module:
        """The meta-learned network (its parameters are θ)."""
        return self.meta_learner.model

    def forward(self, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        return self.meta_learner(x, params)

    # -- adaptation and evaluation ------------------------------------------------------------------

    def adapt_batch(self, batch, steps: int, stage: str, *options) -> TaskBatchResult:
        """Adapt every task of a meta-batch and score its query set; stop on NaN/inf.

        ``options`` are the further arguments of ``meta_learner.adapt_tasks``, after ``vectorize``
        (Meta-SGD: ``first_order``, ``step_weights``; Reptile: ``batch_size``, ``seeds``).
        """
        support_x, support_y, query_x, query_y = check_task_batch(batch)
        self._check_targets(support_y, query_y)
        return self._adapt_checked((support_x, support_y, query_x, query_y), steps, stage, *options)

    def _adapt_checked(self, batch, steps: int, stage: str, *options, first_task: int = 0) -> TaskBatchResult:
        """:meth:`adapt_batch` for a batch already checked; ``first_task`` is its place in the meta-batch."""
        result = self.meta_learner.adapt_tasks(*batch, self.loss_fn, steps, self.vectorize, *options)
        try:
            result.raise_if_not_finite(f"{stage} (global step {self.global_step})")
        except InnerLoopDivergedError as error:  # name the task by its place in the whole meta-batch
            raise InnerLoopDivergedError(error.step, error.task + first_task, error.value,
                                         f"{stage} (global step {self.global_step})", error.steps) from None
        return result

    def _evaluation_options(self) -> tuple:
        """The further arguments of ``meta_learner.adapt`` (after ``steps``) and ``adapt_tasks`` (after
        ``vectorize``) at validation, test and prediction."""
        return ()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Adapt on each task's support set and predict its query inputs.

        ``batch`` is ``(support_x, support_y, query_x)`` or ``(support_x, support_y, query_x, query_y)``;
        returns class indices ``[tasks, queries]`` (classification) or outputs (regression).
        """
        if isinstance(batch, (tuple, list)) and len(batch) == 3:
            support_x, support_y, query_x = batch
            batch = (support_x, support_y, query_x, torch.zeros(query_x.shape[:2], dtype=support_y.dtype))
        support_x, support_y, query_x, _ = check_task_batch(batch)
        return torch.stack([self.predict_task(sx, sy, qx) for sx, sy, qx in zip(support_x, support_y, query_x)])

    def adapt_task(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """The fast weights for one task, adapted as at evaluation (``eval_inner_steps`` steps by default)."""
        return self.meta_learner.adapt(support_x, support_y, self.loss_fn, steps or self.eval_inner_steps,
                                       *self._evaluation_options())

    def predict_task(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Adapt to one task's support set and predict its queries: class indices, or outputs (regression)."""
        fast = self.adapt_task(support_x, support_y)
        with torch.no_grad():
            output = self.meta_learner(query_x, fast)
        return output.argmax(-1) if self.task == "classification" else output

    def _evaluate(self, batch, stage: str) -> None:
        result = self.adapt_batch(batch, self.eval_inner_steps, stage, *self._evaluation_options())
        for name, value in self._task_values(result, batch[3]).items():
            self.metrics[stage][name].update(value)

    # -- optimisation -------------------------------------------------------------------------------

    def configure_optimizers(self):
        optimizer = self._configure_optimizer()
        scheduler = self._configure_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    def _configure_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of θ (and of whatever else the method learns)."""
        return self.optimizer_factory([p for p in self.meta_learner.parameters() if p.requires_grad])

    def _configure_scheduler(self, optimizer: torch.optim.Optimizer):
        """The learning-rate scheduler, or ``None``."""
        return None if self.lr_scheduler_factory is None else self.lr_scheduler_factory(optimizer)

    def _optimizer_step(self, optimizer) -> None:
        """Clip the gradient (``gradient_clip_val``), step the optimiser, then the scheduler of a training step."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step()

    # -- logging ------------------------------------------------------------------------------------

    def _log_training_step(self, tasks: int, progress: tuple[str, Tensor], shown: Callable[[], dict[str, Tensor]],
                           more: Callable[[], dict[str, Tensor | float]]) -> None:
        """Log a training step's scalars where Lightning writes them.

        Lightning writes step metrics every ``log_every_n_steps`` only, and each ``self.log`` call costs
        ~1 ms (a tenth of a GPU step): ``shown()`` (also on the progress bar) and ``more()`` are called
        and logged on those steps alone, with the tasks per second; on the other steps a progress
        bar, if any, gets ``progress`` (name, value), which costs nothing to compute.
        """
        self._tasks_since_log += tasks
        if self._is_logging_step():
            self.log_dict(shown(), prog_bar=True, batch_size=tasks)
            self.log_dict(more(), batch_size=tasks)
            self._log_throughput(tasks)
        elif self.trainer.progress_bar_callback is not None:
            self.log(progress[0], progress[1], prog_bar=True, batch_size=tasks)

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes this training step's metrics: every ``log_every_n_steps`` steps, and the last.

        Called after the optimiser step; manual optimisation takes exactly one step per batch, so
        ``global_step`` counts this batch (Lightning's own rule counts batches that stepped).
        """
        every = self.trainer.log_every_n_steps
        return bool(every) and (self.global_step % every == 0 or self.trainer.should_stop)

    def _reset_throughput_clock(self) -> None:
        # The time spent in validation and between epochs is not training time.
        self._last_log_time, self._tasks_since_log = None, 0

    def _log_throughput(self, tasks: int) -> None:
        """Tasks per second over all devices since the last logged step (wall time, data loading included)."""
        now = time.perf_counter()
        if self._last_log_time is not None:
            rate = self._tasks_since_log * self.trainer.world_size / (now - self._last_log_time)
            self.log("train/tasks_per_sec", rate, batch_size=tasks)
        self._last_log_time, self._tasks_since_log = now, 0

    def _task_values(self, result: TaskBatchResult, query_y: Tensor) -> dict[str, Tensor]:
        """Per-task values of each metric, ``[tasks]``."""
        loss = result.query_loss.detach()
        if self.task == "classification":
            return {"loss": loss, "acc": task_accuracy(result.query_output.detach(), query_y)}
        return {"mse": loss}

    def _log_stage(self, stage: str) -> dict[str, dict[str, Tensor]]:
        results = {}
        for name, metric in self.metrics[stage].items():
            if not metric.update_called:
                continue
            result = metric.compute()  # all-reduced across devices by torchmetrics
            results[name] = result
            # Python floats: already synchronised, so Lightning must not reduce them again.
            self.log(f"{stage}/{name}", float(result["mean"]), prog_bar=stage == "val")
            self.log(f"{stage}/{name}_ci95", float(result["ci95"]))
            metric.reset()
        return results

    # -- hooks --------------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self._reset_throughput_clock()

    def on_validation_epoch_end(self) -> None:
        results = self._log_stage("val")
        self._reset_throughput_clock()
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step
        monitored = self.monitor[0].split("/")[1]
        if monitored in results:
            # TensorBoard's HParams view shows `hp_metric` beside the hyperparameters.
            self.log("hp_metric", float(results[monitored]["mean"]))
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, ReduceLROnPlateau) and not self.trainer.sanity_checking:
            scheduler.step(self.trainer.callback_metrics[self.monitor[0]])

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_stage("test")
        if isinstance(self.logger, TensorBoardLogger) and self.test_results:
            # Final test metrics beside the hyperparameters in TensorBoard's HParams view.
            metrics = {f"hparams/test_{name}": float(r["mean"]) for name, r in self.test_results.items()}
            metrics.update({f"hparams/test_{name}_ci95": float(r["ci95"]) for name, r in self.test_results.items()})
            self.logger.log_hyperparams(self.hparams, metrics)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Name the first mismatch instead of load_state_dict's wall of text.
        saved, ours = checkpoint.get("state_dict", {}), self.state_dict()
        missing = sorted(set(ours) - set(saved))
        unexpected = sorted(set(saved) - set(ours))
        mismatched = [(k, tuple(saved[k].shape), tuple(v.shape)) for k, v in ours.items() if k in saved and saved[k].shape != v.shape]
        if missing or unexpected or mismatched:
            detail = (
                f"parameter {mismatched[0][0]} has shape {mismatched[0][1]} in the checkpoint but {mismatched[0][2]} here"
                if mismatched else f"missing here: {unexpected[:3]}; missing in the checkpoint: {missing[:3]}"
            )
            raise ValueError(
                "The checkpoint was saved from a different architecture than the model configured now: "
                f"{detail}. Use the model settings the checkpoint was trained with (its hparams.yaml / config.yaml), "
                f"or {type(self).__name__}.load_from_checkpoint(path), which rebuilds the model from the checkpoint."
            )

    # -- helpers ------------------------------------------------------------------------------------

    def _save_hyperparameters(self, frame: FrameType | None, **objects) -> None:
        """``save_hyperparameters`` of the subclass's ``__init__`` (``frame``), then :meth:`_store_hparams_as_config`."""
        with warnings.catch_warnings():
            # The model is saved in the hyperparameters on purpose: load_from_checkpoint rebuilds it.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters(frame=frame)
        self._store_hparams_as_config(**objects)

    def _store_hparams_as_config(self, **objects) -> None:
        """Store the model, optimiser and scheduler as ``class_path`` configs, as the CLI does.

        Then a checkpoint of a module built in Python holds no pickled objects: ``load_from_checkpoint``
        rebuilds them with ``weights_only`` loading, the safe default. Objects that cannot be described
        (a model without recorded ``init_args``, a lambda) stay as they are, pickled.
        """
        if "_instantiator" in self.hparams:  # built by the CLI: already configs
            return
        configs = {name: _as_config(obj) for name, obj in objects.items()}
        if any(config is _NOT_A_CONFIG for config in configs.values()):
            return
        self.hparams.update(configs)
        self.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"

    def _check_targets(self, support_y: Tensor, query_y: Tensor) -> None:
        if self.task == "classification":
            for name, y in (("support_y", support_y), ("query_y", query_y)):
                if y.is_floating_point() or y.dim() != 2:
                    raise ValueError(
                        f"task='classification' needs integer class labels of shape [tasks, examples]; {name} is "
                        f"{y.dtype} of shape {tuple(y.shape)}. For real-valued targets use task='regression'."
                    )
        elif not (support_y.is_floating_point() and query_y.is_floating_point()):
            raise ValueError(
                f"task='regression' needs floating-point targets; got support_y {support_y.dtype} and query_y "
                f"{query_y.dtype}. For class labels use task='classification'."
            )


class MetaSGDLightningModule(MetaLearningModule):
    """Meta-SGD (or MAML with ``learn_lr=False``) trained episodically with Lightning.

    Args:
        model: the network to meta-learn (e.g. :class:`~metasgd_lightning.models.ConvNet4`).
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
        >>> from metasgd_lightning.models import SineMLP
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
        _check_positive_or_none("lr_meta_lr", lr_meta_lr)
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

    def adapt_batch(self, batch, steps: int, stage: str, first_order: bool | None = None,
                    step_weights: Tensor | None = None) -> TaskBatchResult:
        """Adapt every task of a meta-batch and score its query set; stop on NaN/inf."""
        return super().adapt_batch(batch, steps, stage, first_order, step_weights)

    def _evaluation_options(self) -> tuple:
        # first_order=True: no meta-gradient is needed at evaluation, and first order gives the same fast
        # weights with less memory.
        return (True,)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        steps, epoch = self.meta_learner.inner_steps, self.current_epoch
        first_order = True if epoch < self.first_order_epochs else None  # None: the configured order
        step_weights = None
        if self.multi_step_loss:
            step_weights = multi_step_loss_weights(steps, epoch, self.multi_step_loss_epochs).to(self.device)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        result = self._adapt_and_backward(batch, steps, first_order, step_weights)
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

    def _adapt_and_backward(self, batch, steps: int, first_order, step_weights) -> TaskBatchResult:
        """Adapt the meta-batch and backpropagate the mean query loss, ``tasks_per_backward`` tasks at a time."""
        batch = check_task_batch(batch)
        self._check_targets(batch[1], batch[3])
        tasks = len(batch[0])
        chunk = min(self.tasks_per_backward or tasks, tasks)
        parts = []
        for start in range(0, tasks, chunk):
            part = [t[start : start + chunk] for t in batch]
            result = self._adapt_checked(part, steps, "training", first_order, step_weights, first_task=start)
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


class ReptileLightningModule(MetaLearningModule):
    """Reptile trained episodically with Lightning: θ moves towards the weights each task's training reaches.

    A training step runs ``inner_steps`` steps of SGD or Adam from θ on every task of the meta-batch
    (on all of its examples: support and query sets together, as Reptile holds nothing out in
    training), each task with a fresh optimiser state, then takes the outer step
    θ ← θ + ε · meanᵢ(θ̃ᵢ − θ) (the paper's Algorithm 2). That step is a gradient step with "gradient"
    θ − mean θ̃ and rate ε: the module hands this gradient to the configured optimiser (plain SGD
    with ε = 1 by default), and ε, the optimiser's learning rate, is annealed linearly to 0 over the
    run, as in the paper. Validation and test adapt on the support set with ``eval_inner_steps`` steps
    of the same inner optimiser and score the query set, as for Meta-SGD.

    Under DDP each rank trains its share of the meta-batch and DDP averages the gradients: the mean of
    the ranks' means over equal shares is the mean over all tasks, so W devices with meta-batch b take
    the steps of one device with meta-batch W·b (``tests/test_ddp.py``).

    Args:
        model: the network to meta-learn (e.g. :class:`~metasgd_lightning.models.ConvNet4`).
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
        anneal: anneal ε, the outer optimiser's learning rate, linearly to 0 over the run's training
            steps (``Trainer.estimated_stepping_batches``), the paper's schedule. A given
            ``lr_scheduler`` replaces it.
        vectorize: ``"vmap"`` adapts the tasks of a meta-batch at once, ``"loop"`` one by one,
            ``"auto"`` uses vmap on GPUs and the loop on CPUs.
        gradient_clip_val: clip θ − mean θ̃ to this total norm before the outer step (``None``: no clipping).
        optimizer: the outer optimiser, given θ − mean θ̃ as θ's gradient. ``None``: plain SGD with
            learning rate ε = 1, the paper's update θ ← θ + ε · mean(θ̃ − θ). Another optimiser (e.g.
            Adam, which the paper mentions as an alternative) takes its learning rate as ε.
        lr_scheduler: a scheduler of ε, stepped after every training step (``ReduceLROnPlateau``
            after every validation, on the monitored metric); replaces ``anneal``.

    Reference:
        Nichol, Achiam and Schulman (2018). On First-Order Meta-Learning Algorithms. arXiv:1803.02999.

    Example:
        >>> from metasgd_lightning.models import SineMLP
        >>> from datamodules import SineDataModule
        >>> module = ReptileLightningModule(SineMLP(), task="regression", inner_optimizer="sgd", inner_lr=0.02,
        ...                                 inner_steps=5, eval_inner_steps=32)
        >>> data = SineDataModule(meta_batch_size=4, val_tasks=8, test_tasks=8)
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
        anneal: bool = True,
        vectorize: Vectorize = "auto",
        gradient_clip_val: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(task, vectorize, gradient_clip_val)
        check_positive_int("eval_inner_steps", eval_inner_steps, or_none=True)
        check_positive_int("eval_inner_batch_size", eval_inner_batch_size, or_none=True)
        self._save_hyperparameters(inspect.currentframe(), model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.meta_learner = Reptile(model, inner_lr, inner_steps, inner_optimizer, inner_betas,
                                    batch_size=inner_batch_size)
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.eval_inner_batch_size = eval_inner_batch_size
        self.anneal = bool(anneal)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    def _evaluation_options(self) -> tuple:
        # batch_size; no seeds: every task starts its mini-batch order from the same seed, since tasks are
        # adapted independently at evaluation, and the order is then the same on any number of devices.
        return (self.eval_inner_batch_size,)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        support_x, support_y, query_x, query_y = check_task_batch(batch)
        self._check_targets(support_y, query_y)
        # Reptile trains on all of a task's examples: no query set is held out in training.
        x, y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
        step = self.meta_learner.meta_step(x, y, self.loss_fn, vectorize=self.vectorize, seeds=self._task_seeds(len(x)))
        step.raise_if_not_finite(f"training (global step {self.global_step})")
        optimizer = self.optimizers()
        optimizer.zero_grad()
        # The outer update as a gradient: backpropagating Σ ⟨θ, d⟩ with d = θ − mean θ̃ held constant gives
        # θ the gradient d exactly, through Lightning's own path: DDP averages it over the ranks (the mean
        # over all tasks) and a 16-mixed loss scaler scales and unscales it, as for any loss.
        theta = dict(self.meta_learner.model.named_parameters())
        self.manual_backward(sum((theta[name] * d).sum() for name, d in step.direction.items()))
        epsilon = float(optimizer.param_groups[0]["lr"])  # this step's ε, before the scheduler anneals it
        self._optimizer_step(optimizer)
        after = step.support_loss[:, -1].mean()
        self._log_training_step(
            len(x), ("train/support_loss_after", after),
            # The loss of each task's examples after its inner loop, and before it (on the first step's examples).
            shown=lambda: {"train/support_loss_after": after},
            more=lambda: {
                "train/support_loss_before": step.support_loss[:, 0].mean(),
                "train/outer_step_norm": torch.linalg.vector_norm(torch.cat([d.flatten() for d in step.direction.values()])),
                "train/meta_lr": epsilon,
            },
        )
        return after

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
