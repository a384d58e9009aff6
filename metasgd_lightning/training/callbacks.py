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
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

from .._internals.lightning_internals import (
    monitor_candidates,
    rank_and_save,
    reset_checkpoint_monitor,
    save_last_checkpoint,
    teardown_trainer,
    training_batch_progress,
)
from ..methods.contract import check_positive_int
from .checkpointing import Preempted

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
        self._phase: str | None = None  # what the run is doing, for the stop signals; None: not watching them
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.monitor == "auto":
            # ModelCheckpoint derives its state from `monitor` and `mode` in its constructor: set them again with
            # the module's metric, before the Trainer restores a saved state of this callback.
            monitor, mode = getattr(pl_module, "monitor", (None, "min"))
            args, kwargs = self.constructor_arguments
            reset_checkpoint_monitor(self, *args, **{**kwargs, "monitor": monitor, "mode": mode})
        super().setup(trainer, pl_module, stage)
        self.watch_signals(trainer)

    # -- when to save last.ckpt ---------------------------------------------------------------------

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._enter(trainer, "the sanity check")

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self._enter(trainer, "set-up")

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()
        self._enter(trainer, "training")
        if trainer.ckpt_path and self._speaks:
            # Printed, not logged: Lightning's "Restoring states ..." log line does not reach every run's output.
            print(f"Resumed from {trainer.ckpt_path} at step {trainer.global_step}.", file=sys.stderr, flush=True)

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

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        if not trainer.sanity_checking:
            fitting = trainer.state.fn == TrainerFn.FITTING
            self._enter(trainer, "validation" if fitting else "validation (metasgd validate)")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if self._phase != "validation":
            return
        # A stop signal abandons a validation in progress (its result is lost; the next one runs on schedule after
        # a resume), unless this is its last batch. Under DDP the ranks agree first (one small all-reduce per batch).
        (stop,) = self._agree(trainer, self._received or 0)
        batches = trainer.num_val_batches[dataloader_idx] if dataloader_idx < len(trainer.num_val_batches) else 0
        if stop and batch_idx < batches - 1:
            if self.last_saved_step != trainer.global_step:
                self.save_last_now(trainer)
            self._stop(trainer, stop, abandoned=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        before = self._last_file_stamp()
        super().on_validation_end(trainer, pl_module)  # ranks the weights among the best (and may save last)
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.fast_dev_run:
            return
        self._enter(trainer, "training")
        # ModelCheckpoint saves last.ckpt here only when a best checkpoint was saved: save it anyway, after the
        # ranking, so that it holds this validation's result and a resumed run does not validate again.
        if self._last_file_stamp() == before:
            self.save_last_now(trainer)
        else:
            self._saved_last(trainer)
        (stop,) = self._agree(trainer, self._received or 0)
        if stop:
            self._stop(trainer, stop)

    def on_test_start(self, trainer, pl_module) -> None:
        super().on_test_start(trainer, pl_module)
        self._enter(trainer, "testing")

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._enter(trainer, "prediction")

    def on_train_end(self, trainer, pl_module) -> None:
        self._enter(trainer, "the end of training")
        if self.save_last and not trainer.fast_dev_run and self.last_saved_step != trainer.global_step:
            self.save_last_now(trainer)  # a safety net: the rules above save the final step already

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        received, phase = self._received, self._phase
        self._stop_watching()
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, Preempted) or trainer.state.fn != TrainerFn.FITTING and not received:
            return
        progress = training_batch_progress(trainer).current
        consistent = (trainer.world_size == 1 and phase in ("training", "validation") and not trainer.sanity_checking
                      and progress.ready == progress.completed)
        if received and consistent and trainer.state.fn == TrainerFn.FITTING and self.last_saved_step != trainer.global_step:
            # Stopped by a signal while waiting for data (e.g. the job's data workers were signalled too): the last
            # step is complete, so its state is consistent and worth saving.
            self.save_last_now(trainer)
        if received and not isinstance(exception, KeyboardInterrupt):
            # The error is what the stop signal caused (a DataLoader worker it ended, most often): the run was
            # preempted, and a scheduler must see the signal's exit code, not a crash.
            saved = self.last_saved_step == trainer.global_step and consistent
            message = self._message(trainer, received, phase if not saved else None)
            self._say(message)
            teardown_trainer(trainer)  # what Lightning would do after this hook; it does not once this hook raises
            raise Preempted(received, message) from None
        if not trainer.is_global_zero:
            return
        if self.last_model_path and Path(self.last_model_path).is_file():
            print(f"Training stopped by {type(exception).__name__} at step {trainer.global_step}; the last checkpoint, "
                  f"{self.last_model_path} (step {self.last_saved_step}), is intact: after fixing the cause, resume "
                  "with --ckpt_path last.", file=sys.stderr, flush=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop_watching()
        super().teardown(trainer, pl_module, stage)

    def save_last_now(self, trainer) -> None:
        """Write ``last.ckpt`` with the current state (all ranks must call this together under DDP)."""
        if not self.save_last:
            return
        save_last_checkpoint(self, trainer)
        self._saved_last(trainer)

    def _saved_last(self, trainer) -> None:
        self.last_saved_step, self._last_save_time = trainer.global_step, time.monotonic()
        self._last_saves += 1

    def _last_file_stamp(self) -> tuple[str, int] | None:
        """``last.ckpt``'s path and modification time: how to tell that ModelCheckpoint saved it itself."""
        path = self.last_model_path
        try:
            return (path, os.stat(path).st_mtime_ns) if path else None
        except OSError:
            return None

    def rank_validation(self, trainer) -> None:
        """Rank a validation that ran after ``fit`` (the CLI's final one, on the final weights) among the best."""
        current = monitor_candidates(self, trainer).get(self.monitor) if self.monitor else None
        if not self.save_top_k or current is None or not self.check_monitor_top_k(trainer, current):
            return
        rank_and_save(self, trainer, current)
        self.save_last_now(trainer)  # so that last.ckpt records the new best

    @staticmethod
    def _is_final_step(trainer) -> bool:
        """Whether the training step that just ended is the run's last (all ranks decide alike)."""
        if trainer.should_stop or (trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps):
            return True
        progress = training_batch_progress(trainer)
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
    # Phases: in "training" and "validation" (inside fit) a signal is noted and acted on at the end of the step or
    # at the next validation batch; in every other phase (set-up, the sanity check, testing, ...) nothing is being
    # trained, so the handler stops the run at once.

    def watch_signals(self, trainer=None) -> None:
        """Take over the stop signals from now on, in the set-up phase (the CLI calls this before ``fit`` starts).

        Lightning installs its own SIGTERM handler once set-up is done; this callback takes the signals back
        at each phase's start, so that its handler is the one that runs.
        """
        if trainer is not None:
            self._trainer = trainer
        if self._phase is None:
            self._received = None
            self._speaks = rank_zero_only.rank == 0
        self._enter(self._trainer, "set-up")

    def _enter(self, trainer, phase: str) -> None:
        if trainer is not None:
            self._trainer, self._speaks = trainer, trainer.is_global_zero
        self._phase = phase
        self._install_signal_handlers()
        if self._received is not None and phase not in _DEFERRED:
            self._stop_at_once(self._received)  # a signal noted in training, reaching a phase that cannot wait

    def _stop_watching(self) -> None:
        self._phase = None
        self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        for signum in self.stop_signals:
            if signal.getsignal(signum) == self._on_signal:
                continue
            try:
                previous = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: signals stay as they are
                return
            self._previous_handlers.setdefault(signum, previous)  # the first: Lightning's comes and goes in between

    def _restore_signal_handlers(self) -> None:
        # The handlers found first are kept (not cleared): Lightning's teardown may put ours back afterwards.
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                try:
                    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
                except ValueError:
                    break

    def _on_signal(self, signum, frame) -> None:
        if self._phase is None:  # left installed by Lightning's teardown after a run ended: act as before the run
            handler = self._previous_handlers.get(signum, signal.SIG_DFL)
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
            return
        if self._received is not None:
            if signum == signal.SIGINT and self._phase in _DEFERRED:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once (Lightning shuts down without saving)
            return  # already stopping
        self._received = signum
        if self._phase not in _DEFERRED:
            self._stop_at_once(signum)
        if self._speaks:
            name = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            where = "this step" if self._phase == "training" else "this validation batch (the validation is abandoned)"
            # os.write: safe inside a signal handler, where print may be reentered.
            os.write(2, f"\n{name} received: saving a checkpoint at the end of {where}, then stopping{again}.\n".encode())

    def _stop_at_once(self, signum: int) -> None:
        """End the run now: nothing is being trained in this phase, so there is nothing new to save."""
        phase, trainer = self._phase, self._trainer
        self._phase = "stopping"
        message = self._message(trainer, signum, phase)
        self._say(message)
        raise Preempted(signum, message)

    def _message(self, trainer, signum: int, phase: str | None, abandoned: bool = False) -> str:
        """The "Stopped by ..." line: the step, and the checkpoint saved (``phase`` None) or why there is none."""
        name, step = signal.Signals(signum).name, trainer.global_step if trainer is not None else 0
        resume = "Resume with the same command and --ckpt_path last."
        if phase is None:
            saved = f"saved {self.last_model_path}" if self.save_last else "nothing saved (save_last is off)"
            extra = " (the validation in progress was abandoned)" if abandoned else ""
            return f"Stopped by {name} at step {step}{extra}: {saved}. {resume}"
        if phase in ("testing", "prediction") or phase.startswith("validation ("):
            return f"Stopped by {name} during {phase.split(' (')[0]}: no result, and nothing to save (it trains nothing)."
        if self.last_model_path and Path(self.last_model_path).is_file() and step:
            return (f"Stopped by {name} during {phase} at step {step}: nothing trained since, so "
                    f"{self.last_model_path} is left as it was. {resume}")
        return f"Stopped by {name} during {phase} at step {step}: nothing trained yet, so no checkpoint was saved."

    def _say(self, message: str) -> None:
        # Printed, not logged: the line must reach the user whatever the logging set-up.
        if self._speaks:
            print(message, file=sys.stderr, flush=True)

    def _stop(self, trainer, signum: int, abandoned: bool = False) -> None:
        self._phase = "stopping"
        message = self._message(trainer, signum, None, abandoned)
        self._say(message)
        raise Preempted(signum, message)


#: The phases in which a stop signal waits for the end of the step (or the next validation batch).
_DEFERRED = ("training", "validation")


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
