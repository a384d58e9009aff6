"""Progress of meta-training, validation and testing: a live bar in a terminal, a line now and then elsewhere.

:class:`MetaProgressBar` is Lightning's TQDM progress bar with the meta-step, the training metric and
tasks per second. When the output is not a terminal (CI, a log file, a SLURM job), a bar redrawn in
place fills the log with carriage returns, so it prints one plain line every ``line_every_n_steps``
steps or ``line_every_seconds`` seconds instead::

    training from step 0 of 2000
    step 120/2000 (6%) epoch 1/10 | train/mse 0.531 | 95.3 tasks/s | ETA 8m13s
    validation at step 200: batch 12/24, 30 s
    validation at step 200 done in 58s | val/mse 0.412
    training ended at step 2000: 50000 tasks in 8m45s of training, 95.2 tasks/s

(``epoch 1/10`` when training ends by ``max_epochs``; with ``max_steps``, the epoch alone.)
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import Tensor

__all__ = ["MetaProgressBar"]


class MetaProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with the meta-step and tasks/s, or plain lines when the output is not a terminal.

    Args:
        refresh_rate: redraw the bar every this many batches (terminal only).
        line_every_n_steps: without a terminal, a line every this many training steps (None: by time only).
        line_every_seconds: without a terminal, a line at least this often (seconds) during training,
            validation and testing.
        terminal: draw a bar (True) or print lines (False); None (default): a bar when standard output is a
            terminal.
        leave: keep each epoch's bar on screen (terminal only).
    """

    def __init__(self, refresh_rate: int = 1, line_every_n_steps: int | None = None, line_every_seconds: float = 30.0,
                 terminal: bool | None = None, leave: bool = False) -> None:
        if line_every_n_steps is not None and (not isinstance(line_every_n_steps, int) or line_every_n_steps < 1):
            raise ValueError(f"`line_every_n_steps` must be a positive integer or None; got {line_every_n_steps!r}.")
        if not isinstance(line_every_seconds, (int, float)) or line_every_seconds <= 0:
            raise ValueError(f"`line_every_seconds` must be a positive number; got {line_every_seconds!r}.")
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.line_every_n_steps, self.line_every_seconds, self.terminal = line_every_n_steps, line_every_seconds, terminal
        self._rate: float | None = None  # tasks per second over the last window
        self._window = (time.monotonic(), 0)  # (start, tasks since)
        self._last_line = (time.monotonic(), 0)  # (time, step) of the last line printed
        self._eval_start = self._eval_last = time.monotonic()
        self._train_start, self._eval_seconds, self._tasks_total = time.monotonic(), 0.0, 0  # for the closing line

    @property
    def lines(self) -> bool:
        """Whether this bar prints plain lines (the output is not a terminal) rather than drawing a bar."""
        if self.terminal is not None:
            return not self.terminal
        isatty = getattr(sys.stdout, "isatty", None)
        return not (callable(isatty) and isatty())

    # -- the bar: Lightning's, switched off in line mode ------------------------------------------------

    def _bar(self, make) -> Tqdm:
        # In line mode no bar is drawn: a disabled one takes Lightning's updates and prints nothing.
        return Tqdm(disable=True) if self.lines else make()

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Tqdm:
        return self._bar(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Tqdm:
        return self._bar(super().init_validation_tqdm)

    def init_test_tqdm(self) -> Tqdm:
        return self._bar(super().init_test_tqdm)

    def init_predict_tqdm(self) -> Tqdm:
        return self._bar(super().init_predict_tqdm)

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        shown: dict[str, Any] = {"step": trainer.global_step}
        shown.update(metrics)
        if self._rate is not None:
            shown["tasks/s"] = f"{self._rate:.1f}"
        return shown

    # -- training ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._window, self._last_line = (time.monotonic(), 0), (time.monotonic(), trainer.global_step)
        self._train_start, self._eval_seconds, self._tasks_total = time.monotonic(), 0.0, 0
        note = oversubscription_note() if trainer.is_global_zero and trainer.strategy.root_device.type == "cpu" else None
        if note:
            print(note, file=sys.stderr, flush=True)
        if self.lines and self.is_enabled:
            total = self._total_steps(trainer)
            of = f" of {total}" if total else ""
            self._print(f"training from step {trainer.global_step}{of}")

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._window = (time.monotonic(), 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._count(trainer, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not (self.lines and self.is_enabled):
            return
        now, (last_time, _) = time.monotonic(), self._last_line
        every = self.line_every_n_steps
        if (every and trainer.global_step % every == 0) or now - last_time >= self.line_every_seconds:
            self._print(self._training_line(trainer, pl_module))
            self._last_line = (now, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.lines and self.is_enabled:
            seconds = time.monotonic() - self._train_start - self._eval_seconds
            rate = f", {self._tasks_total / seconds:.1f} tasks/s" if seconds > 0 and self._tasks_total else ""
            self._print(f"training ended at step {trainer.global_step}: {self._tasks_total} tasks in "
                        f"{_duration(seconds)} of training{rate}")

    def _count(self, trainer, batch: Any) -> None:
        """Add the batch's tasks to the window; every second or more, turn the window into tasks per second."""
        start, tasks = self._window
        tasks += _tasks_in(batch) * trainer.world_size
        self._tasks_total += _tasks_in(batch) * trainer.world_size
        elapsed = time.monotonic() - start
        if elapsed >= 1.0:
            self._rate, self._window = tasks / elapsed, (time.monotonic(), 0)
        else:
            self._window = (start, tasks)

    def _training_line(self, trainer, pl_module) -> str:
        step, total = trainer.global_step, self._total_steps(trainer)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        epochs = f"/{trainer.max_epochs}" if trainer.max_steps in (None, -1) and trainer.max_epochs not in (None, -1) else ""
        parts[0] += f" epoch {trainer.current_epoch + 1}{epochs}"
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k not in ("step", "tasks/s")}
        fields = [" ".join(parts)] + [f"{name} {_number(value)}" for name, value in metrics.items()]
        start, tasks = self._window
        rate = self._rate or (tasks / (time.monotonic() - start) if tasks else None)  # before a whole second
        if rate:
            fields.append(f"{rate:.1f} tasks/s")
            tasks_per_step = _tasks_in_step(trainer)
            if total and tasks_per_step:
                fields.append(f"ETA {_duration((total - step) * tasks_per_step / rate)}")
        return " | ".join(fields)

    @staticmethod
    def _total_steps(trainer) -> int | None:
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - e.g. an iterable data loader of unknown length
            return None
        return int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None

    # -- validation and testing -------------------------------------------------------------------------

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        self._eval_started(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_progress(trainer, "validation", batch_idx, self.total_val_batches_current_dataloader)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.training or trainer.state.fn == "fit":
            self._eval_seconds += time.monotonic() - self._eval_start  # validation time is not training time
        if self.lines and self.is_enabled and not trainer.sanity_checking:
            self._print(self._eval_line(trainer, "validation", "val/"))
        self._window = (time.monotonic(), 0)  # validation time is not training time

    def on_test_start(self, trainer, pl_module) -> None:
        super().on_test_start(trainer, pl_module)
        self._eval_started(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_progress(trainer, "test", batch_idx, self.total_test_batches_current_dataloader)

    def on_test_end(self, trainer, pl_module) -> None:
        super().on_test_end(trainer, pl_module)
        if self.lines and self.is_enabled:
            self._print(self._eval_line(trainer, "test", "test/"))

    def _eval_started(self, trainer) -> None:
        self._eval_start = self._eval_last = time.monotonic()

    def _eval_progress(self, trainer, stage: str, batch_idx: int, total: float) -> None:
        if not (self.lines and self.is_enabled) or trainer.sanity_checking:
            return
        now = time.monotonic()
        if now - self._eval_last >= self.line_every_seconds:
            of = f"/{int(total)}" if isinstance(total, (int, float)) and math.isfinite(total) else ""
            self._print(f"{stage} at step {trainer.global_step}: batch {batch_idx + 1}{of}, {now - self._eval_start:.0f} s")
            self._eval_last = now

    def _eval_line(self, trainer, stage: str, prefix: str) -> str:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and not k.endswith("_ci95")}
        fields = [f"{stage} at step {trainer.global_step} done in {_duration(time.monotonic() - self._eval_start)}"]
        fields += [f"{name} {_number(value)}" for name, value in metrics.items()]
        return " | ".join(fields)

    def _print(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)


def oversubscription_note(threads: int | None = None, load: float | None = None, cores: int | None = None) -> str | None:
    """One line when torch's intra-op threads and the machine's other work need more cores than there are, else None.

    On a shared CPU, threads that wait for a core busy with other work make each step wait for the slowest:
    Omniglot training measured several times slower than with one thread (docs/results.md, "Intra-op threads").
    ``load`` is the 1-minute load average, which counts this process (about one core) too.
    """
    threads = torch.get_num_threads() if threads is None else threads
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) \
        if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows
            return None
    others = max(load - 1.0, 0.0)
    if threads <= 1 or others < 1.0 or others + threads <= cores:
        return None
    return (f"Note: other work keeps about {others:.0f} of this machine's {cores} cores busy and torch uses {threads} "
            "threads; on a shared CPU that can make training several times slower. Try OMP_NUM_THREADS=1 (README, "
            "\"Long runs\").")


def _tasks_in(batch: Any) -> int:
    """The number of tasks in a meta-batch: the leading size of its first tensor (1 if it has none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, Tensor):
                return _tasks_in(item)
    return 1


def _tasks_in_step(trainer) -> int | None:
    datamodule = getattr(trainer, "datamodule", None)
    size = getattr(datamodule, "meta_batch_size", None)
    return int(size) * trainer.world_size if isinstance(size, int) else None


def _number(value: Any) -> str:
    if isinstance(value, Tensor):
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
