"""Callbacks with Meta-SGD's defaults."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from .metasgd import check_positive_int

__all__ = ["LearnedRateMonitor", "MetaSGDCheckpoint"]


class MetaSGDCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` and the best checkpoint by the module's validation metric.

    With ``monitor="auto"`` (the default) the metric comes from the module's ``monitor`` attribute when
    the Trainer sets the callback up: ``val/acc`` (higher is better) for classification, ``val/mse``
    (lower is better) for regression; ``mode`` is then the module's too. Every other argument is
    ``ModelCheckpoint``'s.
    """

    def __init__(self, *args, monitor: str | None = "auto", save_last: bool | None = True,
                 filename: str | None = "best-{step}", **kwargs) -> None:
        super().__init__(*args, monitor=monitor, save_last=save_last, filename=filename, **kwargs)
        self.constructor_arguments = (args, dict(kwargs, save_last=save_last, filename=filename))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.monitor == "auto":
            # ModelCheckpoint derives its state from `monitor` and `mode` in its constructor: run it again
            # with the module's metric, before the Trainer restores a saved state of this callback.
            monitor, mode = getattr(pl_module, "monitor", (None, "min"))
            args, kwargs = self.constructor_arguments
            ModelCheckpoint.__init__(self, *args, **{**kwargs, "monitor": monitor, "mode": mode})
        super().setup(trainer, pl_module, stage)


class LearnedRateMonitor(Callback):
    """Logs what Meta-SGD learns in its rates α, per parameter tensor, to TensorBoard.

    Meta-SGD's α is a rate *and* a direction per parameter entry (entries may turn negative). Every
    ``every_n_steps`` training steps this logs, for each adapted parameter, the scalars
    ``lr/<param>/{mean,mean_abs,frac_negative,min,max}`` and, with ``histograms=True`` and a
    TensorBoard logger, the histogram ``lr/<param>``. With per-step rates (``per_step_lr``) each inner
    step's α is logged on its own, as ``lr/<param>/step<k>/...`` and ``lr/<param>/step<k>``. Add it to
    ``trainer.callbacks`` (the ``metasgd`` CLI adds it by default; ``--lr_monitor.every_n_steps 0``
    switches it off).

    Args:
        every_n_steps: logging interval in training steps (0: off).
        histograms: also log the distribution of each α as a histogram.
    """

    def __init__(self, every_n_steps: int = 100, histograms: bool = True) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps, minimum=0)
        self.histograms = histograms

    @staticmethod
    def statistics(alpha: Tensor) -> dict[str, float]:
        """``mean``, ``mean_abs``, ``frac_negative``, ``min`` and ``max`` of one α tensor."""
        alpha = alpha.detach().float()
        values = torch.stack([alpha.mean(), alpha.abs().mean(), (alpha < 0).float().mean(), alpha.min(), alpha.max()])
        return dict(zip(("mean", "mean_abs", "frac_negative", "min", "max"), values.tolist()))

    @staticmethod
    def rates(meta) -> dict[str, Tensor]:
        """Every learned α of a ``MetaSGD`` by its tag: ``<param>``, or ``<param>/step<k>`` with per-step rates."""
        if not meta.per_step_lr:
            return {name: meta.lr(name) for name in meta.adapted_names}
        return {f"{name}/step{k}": meta.lr(name, k) for name in meta.adapted_names for k in range(meta.inner_steps)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step already counts this batch's update; Lightning logs this batch's metrics one step earlier.
        if not self.every_n_steps or trainer.global_step % self.every_n_steps or not trainer.is_global_zero:
            return
        step = trainer.global_step - 1
        if trainer.logger is None:
            return
        meta = pl_module.meta_learner
        if not meta.learn_lr:
            return
        metrics = {}
        for tag, alpha in self.rates(meta).items():
            metrics.update({f"lr/{tag}/{stat}": value for stat, value in self.statistics(alpha).items()})
            if self.histograms and isinstance(trainer.logger, TensorBoardLogger):
                trainer.logger.experiment.add_histogram(f"lr/{tag}", alpha.detach().float().cpu(), step)
        trainer.logger.log_metrics(metrics, step=step)
