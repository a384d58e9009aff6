"""The shared base of the training recipes: a LightningModule with manual optimisation over meta-batches.

Each batch is a meta-batch of tasks ``(support_x, support_y, query_x, query_y)`` with a leading task
dimension. :class:`MetaLearningModule` holds what the methods share: validation and test adapt each
task on its support set and score its query set (per-task metrics with 95% intervals), logging,
throughput, checkpoints that load with ``weights_only``, prediction. Evaluation adapts with gradients,
so the Trainer must run with ``inference_mode=False`` (the configs and the ``metasgd`` CLI set it).
The recipes: :mod:`.metasgd_module` (Meta-SGD, MAML) and :mod:`.reptile_module` (Reptile).
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .._internals.lightning_internals import built_by_cli, mark_as_cli_config
from ..methods.contract import (
    InnerLoopDivergedError,
    TaskBatchResult,
    Vectorize,
    check_positive_int,
    check_task_batch,
)
from .metrics import TaskMeanCI, task_accuracy

__all__ = ["CHECKPOINT_CLASS_KEY", "MetaLearningModule", "SetupError", "Task", "check_positive_or_none"]

Task = Literal["classification", "regression"]

#: The checkpoint entry naming the module class that wrote it, ``"<module>.<qualname>"``.
CHECKPOINT_CLASS_KEY = "meta_learning_module"


class SetupError(ValueError):
    """Pieces of a run that do not fit together (data and model, a checkpoint and the method); the message says
    which, what was given and what to change. The ``metasgd`` command prints it in one line."""


def _regression_loss(output: Tensor, target: Tensor) -> Tensor:
    if output.shape != target.shape:
        raise ValueError(
            f"Regression outputs and targets must have the same shape; the model gave {tuple(output.shape)} "
            f"for targets of shape {tuple(target.shape)}. Match the model's `out_features` to the targets."
        )
    return F.mse_loss(output, target)


_NOT_A_CONFIG = object()


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _as_config(obj: object) -> object:
    """``{"class_path", "init_args"}`` for a model with recorded ``init_args``, a class or a partial of one."""
    if obj is None:
        return None
    if isinstance(obj, nn.Module):
        init_args = getattr(obj, "init_args", None)
        return {"class_path": _qualified_name(type(obj)), "init_args": dict(init_args)} if isinstance(init_args, dict) else _NOT_A_CONFIG
    if isinstance(obj, type):
        return {"class_path": _qualified_name(obj)}
    if isinstance(obj, functools.partial) and isinstance(obj.func, type) and not obj.args:
        return {"class_path": _qualified_name(obj.func), "init_args": dict(obj.keywords)}
    return _NOT_A_CONFIG


def _comparable(value: object) -> object:
    """Lists and tuples alike (YAML and the checkpoint give lists where the module was given tuples)."""
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def _is_setting(value: object) -> bool:
    """A number, string, flag or list of them: a setting to compare (not a model, optimiser or its config)."""
    if isinstance(value, (list, tuple)):
        return all(_is_setting(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_positive_or_none(name: str, value: object) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"`{name}` must be a positive number or None; got {value!r}.")


class MetaLearningModule(L.LightningModule):
    """What the package's meta-learning recipes share; subclass it for a method of your own.

    Validation, test and prediction adapt each task on its support set with ``eval_inner_steps``
    inner steps and score (or predict) its query set; metrics are per-task means with their 95%
    confidence interval (:class:`~metasgd_lightning.training.metrics.TaskMeanCI`, synchronised across devices),
    ``val/acc`` or ``val/mse`` is the monitored metric, training-step scalars are logged where
    Lightning writes them, with tasks per second. Optimisation is manual: a subclass's
    ``training_step`` calls ``manual_backward`` and :meth:`_optimizer_step`.

    A subclass calls ``super().__init__(task, vectorize, gradient_clip_val)``, then
    :meth:`_save_hyperparameters`, and sets:

    - ``self.meta_learner``: a :class:`~metasgd_lightning.methods.contract.MetaLearner` with ``model``
      (the network), ``forward(x, params)``, ``adapt(support_x, support_y, loss_fn, *, steps, **options)``
      (one task's fast weights) and ``adapt_tasks(support_x, support_y, query_x, query_y, loss_fn, *,
      steps, vectorize, **options)`` (a :class:`~metasgd_lightning.methods.contract.TaskBatchResult`), as
      :class:`~metasgd_lightning.MetaSGD` and :class:`~metasgd_lightning.methods.reptile.Reptile` have;
    - ``self.eval_inner_steps``, ``self.optimizer_factory`` and ``self.lr_scheduler_factory``;

    and may override :meth:`evaluation_options` (the keyword options above at evaluation),
    :meth:`_configure_optimizer`, :meth:`_configure_scheduler` and :attr:`method_name` (how plots and
    summaries name the method). Its checkpoints record the class that wrote them, so that
    :func:`~metasgd_lightning.commands.inference.load_meta_learner` rebuilds it (a subclass that
    overrides ``on_save_checkpoint`` calls ``super().on_save_checkpoint``).

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
        check_positive_or_none("gradient_clip_val", gradient_clip_val)
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
        self._data_fits = False  # whether a batch of the data has been run through the model (_check_data_fits)

    @property
    def monitor(self) -> tuple[str, Literal["min", "max"]]:
        """The validation metric that picks the best checkpoint, and whether higher or lower is better."""
        return ("val/acc", "max") if self.task == "classification" else ("val/mse", "min")

    @property
    def method_name(self) -> str:
        """The method this module trains, as plots, summaries and tables name it (e.g. ``"Reptile"``).

        By default the class name without ``LightningModule``; a recipe that trains several methods
        (:class:`~metasgd_lightning.training.metasgd_module.MetaSGDLightningModule`: Meta-SGD, or MAML
        with a fixed rate) overrides it.
        """
        return type(self).__name__.removesuffix("LightningModule") or type(self).__name__

    @property
    def model(self) -> nn.Module:
        """The meta-learned network (its parameters are θ)."""
        return self.meta_learner.model

    def forward(self, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        return self.meta_learner(x, params)

    # -- adaptation and evaluation ------------------------------------------------------------------

    def adapt_batch(self, batch, stage: str, *, steps: int | None = None, **options) -> TaskBatchResult:
        """Adapt every task of a meta-batch and score its query set; stop on NaN/inf.

        ``steps`` (default: the method's training ``inner_steps``) and ``options`` are the keyword
        options of ``meta_learner.adapt_tasks`` (Meta-SGD: ``first_order``, ``step_weights``; Reptile:
        ``batch_size``, ``seeds``).
        """
        support_x, support_y, query_x, query_y = check_task_batch(batch)
        self._check_targets(support_y, query_y)
        return self._adapt_checked((support_x, support_y, query_x, query_y), stage, steps=steps, **options)

    def _adapt_checked(self, batch, stage: str, *, first_task: int = 0, **options) -> TaskBatchResult:
        """:meth:`adapt_batch` for a batch already checked; ``first_task`` is its place in the meta-batch."""
        result = self.meta_learner.adapt_tasks(*batch, self.loss_fn, vectorize=self.vectorize, **options)
        try:
            result.raise_if_not_finite(f"{stage} (global step {self.global_step})")
        except InnerLoopDivergedError as error:  # name the task by its place in the whole meta-batch
            raise InnerLoopDivergedError(error.step, error.task + first_task, error.value,
                                         f"{stage} (global step {self.global_step})", error.steps) from None
        return result

    def evaluation_options(self) -> dict[str, object]:
        """The keyword options of ``meta_learner.adapt`` and ``adapt_tasks`` at validation, test and
        prediction (a method's one override point for evaluation)."""
        return {}

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
        steps = self.eval_inner_steps if steps is None else check_positive_int("steps", steps)
        return self.meta_learner.adapt(support_x, support_y, self.loss_fn, steps=steps, **self.evaluation_options())

    def predict_task(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Adapt to one task's support set and predict its queries: class indices, or outputs (regression)."""
        fast = self.adapt_task(support_x, support_y)
        with torch.no_grad():
            output = self.meta_learner(query_x, fast)
        return output.argmax(-1) if self.task == "classification" else output

    def _evaluate(self, batch, stage: str) -> None:
        result = self.adapt_batch(batch, stage, steps=self.eval_inner_steps, **self.evaluation_options())
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

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._check_data_fits(batch)

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_data_fits(batch)

    def on_test_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_data_fits(batch)

    def _check_data_fits(self, batch) -> None:
        """On the first batch (the sanity check's, or the first step's), run one task's support set through the
        network, and name data that does not fit it (images for the sine MLP, sine curves for a ConvNet, class
        labels for regression) instead of a shape error from deep inside the adaptation."""
        if self._data_fits or not isinstance(batch, (tuple, list)) or len(batch) != 4:
            return
        support_x, support_y = batch[0], batch[1]
        if not (isinstance(support_x, Tensor) and isinstance(support_y, Tensor)) or support_x.dim() < 2:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        data = type(datamodule).__name__ if datamodule is not None else "the training data"
        data_task = getattr(datamodule, "task", None)
        network = type(self.model).__name__
        fix = ("Use the model settings of a config made for this data (e.g. configs/sine_5shot.yaml for sine curves, "
               "configs/omniglot_5way_1shot.yaml for Omniglot images).")
        if data_task in ("classification", "regression") and data_task != self.task:
            raise SetupError(f"{data} gives {data_task} tasks, but the module was built for task={self.task!r} "
                             f"({network}). {fix}")
        example = tuple(support_x.shape[2:])
        try:
            # One task's whole support set (batch norm needs more than one example), under the run's precision.
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                output = self.meta_learner(support_x[0], None)
        except RuntimeError as error:  # a shape error: the network cannot take this data's inputs
            raise SetupError(f"The examples of {data} (inputs of shape {example}) do not fit the network {network}: "
                             f"{str(error).splitlines()[0]}. {fix}") from error
        if self.task == "regression" and tuple(output.shape[1:]) != tuple(support_y.shape[2:]):
            raise SetupError(f"{network} gives outputs of shape {tuple(output.shape[1:])} for the examples of {data}, "
                             f"whose targets have shape {tuple(support_y.shape[2:])}. {fix}")
        self._data_fits = True

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Which class wrote the checkpoint, so that inference.load_meta_learner rebuilds the same one
        # (a plain string: weights_only loading reads it). A subclass that overrides this calls super().
        checkpoint[CHECKPOINT_CLASS_KEY] = _qualified_name(type(self))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._compare_method(checkpoint)
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

    def _compare_method(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another method class; say in one line which method settings differ from it."""
        written_by = checkpoint.get(CHECKPOINT_CLASS_KEY)
        if isinstance(written_by, str) and written_by != _qualified_name(type(self)):
            raise SetupError(f"The checkpoint was written by {written_by.rpartition('.')[2]}, but this run's module is "
                             f"{type(self).__name__}. Use the config the checkpoint was trained with (its config.yaml), "
                             "or start a new run without --ckpt_path.")
        saved = checkpoint.get("hyper_parameters")
        if not isinstance(saved, dict):
            return
        changed = [f"{key} {_short(saved[key])} → {_short(value)}" for key, value in self.hparams.items()
                   if not key.startswith("_") and key not in ("model", "task") and key in saved
                   and _is_setting(saved[key]) and _is_setting(value) and _comparable(saved[key]) != _comparable(value)]
        if changed:
            # Allowed (e.g. more inner steps to fine-tune), but never silently.
            print(f"Settings changed from the checkpoint's: {'; '.join(changed)}.", file=sys.stderr, flush=True)

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
        if built_by_cli(self.hparams):  # already configs
            return
        configs = {name: _as_config(obj) for name, obj in objects.items()}
        if any(config is _NOT_A_CONFIG for config in configs.values()):
            return
        self.hparams.update(configs)
        mark_as_cli_config(self.hparams)

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
