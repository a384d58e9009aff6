"""Callbacks with Meta-SGD's defaults."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from .checkpointing import Preempted
from ..methods.contract import check_positive_int

__all__ = ["LearnedRateMonitor", "MetaSGDCheckpoint"]

# SIGUSR1 does not exist on Windows.
STOP_SIGNALS = tuple(name for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


class MetaSGDCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` current and the best checkpoint by the module's validation metric.

    With ``monitor="auto"`` (the default) the metric comes from the module's ``monitor`` attribute when
    the Trainer sets the callback up: ``val/acc`` (higher is better) for classification, ``val/mse``
    (lower is better) for regression; ``mode`` is then the module's too. The best checkpoints are ranked
    at every validation, the one at the end of training included.

    ``last.ckpt`` (``save_last``) is written at every validation, every ``last_every_n_steps`` training
    steps and every ``last_every_minutes`` of wall-clock time (whichever comes first; time by default),
    at the end of training whatever ends it (``max_steps``, ``max_epochs``, ``max_time``, early stopping,
    a signal), and when one of ``stop_signals`` arrives. So a kill loses at most one interval, and
    ``--ckpt_path last`` resumes exactly: θ, α, optimiser, scheduler, loop counters and the place in the
    task stream. On the last training step the callback asks Lightning to stop (``should_stop``), which
    makes Lightning validate the final weights inside ``fit``, where they are ranked and saved.

    ``stop_signals`` (SIGTERM, SIGUSR1 and SIGINT by default; ``[]`` leaves signals alone): the first
    such signal lets the current training step (or validation) finish, saves ``last.ckpt`` and ends the
    run with :class:`~metasgd_lightning.training.checkpointing.Preempted` (exit code 128 + the signal's number).
    A second Ctrl-C stops at once. Under DDP the ranks agree on stopping and on timed saves at every
    step (one small all-reduce), so they save and stop at the same step.

    Every other argument is ``ModelCheckpoint``'s; ``save_on_train_epoch_end`` defaults to ``False``
    (rank after validation, and save at the end of an epoch through the rules above).
    """

    def __init__(self, *args, monitor: str | None = "auto", save_last: bool | None = True,
                 filename: str | None = "best-{step}", save_on_train_epoch_end: bool | None = False,
                 last_every_n_steps: int | None = None, last_every_minutes: float | None = 2.0,
                 stop_signals: list[str] | None = None, **kwargs) -> None:
        if save_last == "link":
            raise ValueError("MetaSGDCheckpoint writes last.ckpt as a file of its own (a link would point to the best "
                             "checkpoint, not to the last weights): use save_last=True.")
        check_positive_int("last_every_n_steps", last_every_n_steps, or_none=True)
        minutes = last_every_minutes
        if minutes is not None and not (isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and minutes > 0):
            raise ValueError(f"`last_every_minutes` must be a positive number or None; got {last_every_minutes!r}.")
        signals = list(STOP_SIGNALS if stop_signals is None else stop_signals)
        unknown = [name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown:
            raise ValueError(f"`stop_signals` must name signals such as {list(STOP_SIGNALS)}; unknown here: {unknown}.")
        kwargs = dict(kwargs, save_last=save_last, filename=filename, save_on_train_epoch_end=save_on_train_epoch_end)
        super().__init__(*args, monitor=monitor, **kwargs)
        self.constructor_arguments = (args, kwargs)
        self.last_every_n_steps, self.last_every_minutes = last_every_n_steps, last_every_minutes
        self.stop_signals = [getattr(signal, name) for name in signals]
        self.last_saved_step: int | None = None  # global step of the last save of last.ckpt
        self._last_saves = 0  # saves of last.ckpt so far
        self._last_save_time = time.monotonic()
        self._received: int | None = None  # the stop signal received, if any
        self._speaks = True
        self._previous_handlers: dict[int, object] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.monitor == "auto":
            # ModelCheckpoint derives its state from `monitor` and `mode` in its constructor: run it again
            # with the module's metric, before the Trainer restores a saved state of this callback.
            monitor, mode = getattr(pl_module, "monitor", (None, "min"))
            args, kwargs = self.constructor_arguments
            ModelCheckpoint.__init__(self, *args, **{**kwargs, "monitor": monitor, "mode": mode})
        super().setup(trainer, pl_module, stage)

    # -- when to save last.ckpt ---------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time, self._received = time.monotonic(), None
        self._speaks = trainer.is_global_zero  # the rank that says a signal arrived
        # After Lightning's own handlers (registered when fit starts), which this replaces for the run.
        self._install_signal_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.fast_dev_run:
            return
        every = self.last_every_n_steps
        due = bool(every) and trainer.global_step % every == 0
        minutes = self.last_every_minutes
        timed = minutes is not None and time.monotonic() - self._last_save_time >= 60 * minutes
        stop, timed = self._agree(trainer, self._received or 0, int(timed))
        final = self._is_final_step(trainer)
        if stop or due or timed or final:
            self.save_last_now(trainer)
        if final:
            trainer.should_stop = True  # Lightning then validates these weights inside fit (ranked and saved below)
        if stop:
            self._stop(trainer, stop)

    def on_validation_end(self, trainer, pl_module) -> None:
        saves = self._last_saves
        super().on_validation_end(trainer, pl_module)  # ranks the weights among the best (and may save last)
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.fast_dev_run:
            return
        # ModelCheckpoint saves last.ckpt here only when a best checkpoint was saved: save it anyway, after the
        # ranking, so that it holds this validation's result and a resumed run does not validate again.
        if self._last_saves == saves:
            self.save_last_now(trainer)
        (stop,) = self._agree(trainer, self._received or 0)
        if stop:
            self._stop(trainer, stop)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signal_handlers()
        if self.save_last and not trainer.fast_dev_run and self.last_saved_step != trainer.global_step:
            self.save_last_now(trainer)  # a safety net: the rules above save the final step already

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_signal_handlers()
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, Preempted) or trainer.state.fn != TrainerFn.FITTING:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if (self._received and trainer.world_size == 1 and trainer.training and not trainer.sanity_checking
                and progress.ready == progress.completed and self.last_saved_step != trainer.global_step):
            # Stopped by a signal while waiting for the next batch (e.g. the job's data workers were signalled
            # too): the last step is complete, so its state is consistent and worth saving.
            self.save_last_now(trainer)
        if not trainer.is_global_zero:
            return
        if self.last_model_path and Path(self.last_model_path).is_file():
            print(f"Training stopped by {type(exception).__name__} at step {trainer.global_step}; the last checkpoint, "
                  f"{self.last_model_path} (step {self.last_saved_step}), is intact: after fixing the cause, resume "
                  "with --ckpt_path last.", file=sys.stderr, flush=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_signal_handlers()
        super().teardown(trainer, pl_module, stage)

    def save_last_now(self, trainer) -> None:
        """Write ``last.ckpt`` with the current state (all ranks must call this together under DDP)."""
        if not self.save_last:
            return
        # ModelCheckpoint skips every further save of a step once one is made: a save of last.ckpt alone must
        # not keep this step's validation from ranking its weights, so its step mark is put back.
        previous = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = previous

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self.last_saved_step, self._last_save_time = trainer.global_step, time.monotonic()
        self._last_saves += 1

    def rank_validation(self, trainer) -> None:
        """Rank a validation that ran after ``fit`` (the CLI's final one, on the final weights) among the best."""
        candidates = self._monitor_candidates(trainer)
        current = candidates.get(self.monitor) if self.monitor else None
        if not self.save_top_k or current is None or not self.check_monitor_top_k(trainer, current):
            return
        self._update_best_and_save(current, trainer, candidates)
        self.save_last_now(trainer)  # so that last.ckpt records the new best

    @staticmethod
    def _is_final_step(trainer) -> bool:
        """Whether the training step that just ended is the run's last (all ranks decide alike)."""
        if trainer.should_stop or (trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps):
            return True
        progress = trainer.fit_loop.epoch_loop.batch_progress
        last_batch = progress.is_last_batch or progress.current.ready >= trainer.num_training_batches
        max_epochs = trainer.max_epochs
        return bool(last_batch) and max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs

    @staticmethod
    def _agree(trainer, *flags: int) -> list[int]:
        """The largest value of each flag over all ranks (one all-reduce under DDP; as given on one process)."""
        if trainer.world_size == 1:
            return list(flags)
        tensor = torch.tensor(flags, dtype=torch.int64, device=trainer.strategy.root_device)
        return [int(v) for v in trainer.strategy.reduce(tensor, reduce_op="max").tolist()]

    # -- stop signals ---------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        self._restore_signal_handlers()
        for signum in self.stop_signals:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: signals stay as they are
                break

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once (Lightning shuts down without saving)
        if self._received is None and self._speaks:
            name = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            # os.write: safe inside a signal handler, where print may be reentered.
            message = f"\n{name} received: saving a checkpoint at the end of this step, then stopping{again}.\n"
            os.write(2, message.encode())
        self._received = signum

    def _stop(self, trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        saved = f"saved {self.last_model_path}" if self.save_last else "nothing saved (save_last is off)"
        message = (f"Stopped by {name} at step {trainer.global_step}: {saved}. Resume with the same command and "
                   "--ckpt_path last.")
        rank_zero_info(message)
        raise Preempted(signum, message)


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
