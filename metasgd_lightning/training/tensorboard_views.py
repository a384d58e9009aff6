"""What a TensorBoard user should see first: the validation metric with its 95% interval, and pictures of adaptation.

:class:`TensorBoardViews` adds a custom-scalars layout (TensorBoard's "Custom Scalars" tab) with the
meta-training curve and the validation metric drawn with its 95% confidence interval over tasks as a
band (a margin chart of ``val/<metric>``, ``val/<metric>_lower`` and ``val/<metric>_upper``), and logs
a figure of adaptation on a few validation tasks at each validation (the "Images" tab): for sine tasks
the curves of :func:`~metasgd_lightning.commands.task_plots.plot_sine`, for images one task of
:func:`~metasgd_lightning.commands.task_plots.plot_tasks`.

:class:`MetaTensorBoardLogger` (the ``metasgd`` command's default logger) keeps two of Lightning's scalars
off the scalars page, where they would come first: the ``epoch`` counter beside every logged step, and
the placeholder ``hp_metric = -1`` at step 0 (the HParams view still lists ``hp_metric``, which the module
logs at each validation).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..methods.contract import check_positive_int

__all__ = ["MetaTensorBoardLogger", "TensorBoardViews"]


class MetaTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` without the ``epoch`` scalar and without the placeholder ``hp_metric`` of -1.

    The hyperparameters are still written with ``hp_metric`` as their metric (``default_hp_metric``), so
    TensorBoard's HParams view shows the value the module logs at each validation.
    """

    _placeholder = False

    def log_hyperparams(self, params: Any, metrics: dict[str, Any] | None = None) -> None:
        self._placeholder = metrics is None and self._default_hp_metric
        try:
            super().log_hyperparams(params, metrics)
        finally:
            self._placeholder = False

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._placeholder:  # Lightning's hp_metric = -1, logged only to name the metric
            return
        metrics = {name: value for name, value in metrics.items() if name != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)


class TensorBoardViews(Callback):
    """A custom-scalars layout with the validation metric's 95% band, and figures of adaptation at validation.

    Only with a TensorBoard logger, on global rank 0, while fitting.

    Args:
        band: add the layout and log ``val/<metric>_lower`` and ``val/<metric>_upper`` (the mean ∓ the 95%
            interval's half-width) at each validation.
        figures_every_n_validations: log the figure of adaptation every this many validations (0: never).
        figure_tasks: validation tasks in the sine figure (image tasks: one).
    """

    def __init__(self, band: bool = True, figures_every_n_validations: int = 1, figure_tasks: int = 4) -> None:
        self.band = band
        self.figures_every_n_validations = check_positive_int("figures_every_n_validations", figures_every_n_validations,
                                                              minimum=0)
        self.figure_tasks = check_positive_int("figure_tasks", figure_tasks)
        self._validations = 0
        self._figures_failed = False

    @staticmethod
    def _writer(trainer):
        logger = trainer.logger
        if not trainer.is_global_zero or not isinstance(logger, TensorBoardLogger):
            return None
        return logger.experiment

    def on_fit_start(self, trainer, pl_module) -> None:
        writer = self._writer(trainer)
        if writer is None or not self.band:
            return
        names = pl_module.metric_names
        charts = {"meta-training": ["Multiline", [f"^train/({'|'.join(names)})$"]]}
        for name in names:
            charts[f"validation {name} (band: 95% interval over tasks)"] = [
                "Margin", [f"val/{name}", f"val/{name}_lower", f"val/{name}_upper"]]
        writer.add_custom_scalars({getattr(pl_module, "method_name", type(pl_module).__name__): charts})

    def on_validation_end(self, trainer, pl_module) -> None:
        writer = self._writer(trainer)
        if writer is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        step = max(trainer.global_step - 1, 0)  # the step Lightning logs this validation's metrics at
        if self.band:
            metrics = trainer.callback_metrics
            bands = {}
            for name in pl_module.metric_names:
                mean, ci = metrics.get(f"val/{name}"), metrics.get(f"val/{name}_ci95")
                if mean is not None and ci is not None:
                    bands[f"val/{name}_lower"], bands[f"val/{name}_upper"] = float(mean - ci), float(mean + ci)
            if bands:
                trainer.logger.log_metrics(bands, step=step)
        self._validations += 1
        every = self.figures_every_n_validations
        if every and self._validations % every == 0 and not self._figures_failed:
            self._log_figure(trainer, pl_module, writer, step)

    def _log_figure(self, trainer, pl_module, writer, step: int) -> None:
        from .figures import sine_figure, task_figure

        datamodule = trainer.datamodule
        method = getattr(pl_module, "method_name", type(pl_module).__name__)  # Meta-SGD, MAML, Reptile
        try:
            if pl_module.task == "regression" and hasattr(datamodule, "ranges"):
                tasks = datamodule.tasks("val", self.figure_tasks)
                figure = sine_figure(pl_module, tasks, range(self.figure_tasks), datamodule.ranges["x_range"],
                                     title=f"{method}: validation tasks at step {trainer.global_step}")
            elif pl_module.task == "classification" and hasattr(datamodule, "tasks"):
                figure = task_figure(pl_module, datamodule.tasks("val", 1)[0],
                                     f"{method}, validation task 0 at step {trainer.global_step}")
            else:
                return
        except Exception as error:  # noqa: BLE001 - a picture must never stop training
            self._figures_failed = True
            rank_zero_warn(f"TensorBoardViews: no figures of adaptation for this run ({type(error).__name__}: {error}).")
            return
        writer.add_figure("adaptation/validation tasks", figure, global_step=step, close=True)
