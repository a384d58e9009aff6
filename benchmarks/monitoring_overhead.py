"""What TensorBoard monitoring costs per training step, at its default settings.

Trains the same Meta-SGD run three ways, taking turns so that a change in the machine's load hits
each alike, and compares the median wall time per training step:

* ``off``: no logger, no learned-rate monitor (the baseline);
* ``tensorboard``: a TensorBoard logger (Lightning's scalars every ``log_every_n_steps``);
* ``tensorboard + α monitor``: as the ``metasgd`` CLI runs by default: also
  :class:`~metasgd_lightning.training.callbacks.LearnedRateMonitor` every 100 steps, with histograms.

Two workloads: the sine demo's (``SineMLP``, 5-shot, 25 tasks per step: tiny steps, where a fixed
logging cost weighs most) and the Omniglot ConvNet4 (5-way 1-shot, 8 tasks per step, random data of
the real shapes).

    python -m benchmarks.monitoring_overhead            # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from datamodules import SineDataModule
from metasgd_lightning import ConvNet4, MetaSGDLightningModule, SineMLP
from metasgd_lightning.commands._quiet import silence_lightning_noise
from metasgd_lightning.training.callbacks import LearnedRateMonitor

REPO = Path(__file__).resolve().parents[1]

SETTINGS = ("off", "tensorboard", "tensorboard + α monitor")


class StepTimer(L.Callback):
    """Wall time of each training step, from the end of the previous one (so logging hooks count)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def workload(name: str, steps: int):
    """(module, training data) of a workload, built afresh for each run."""
    torch.manual_seed(0)
    if name == "sine":
        module = MetaSGDLightningModule(SineMLP(), task="regression", init_lr=(0.005, 0.1))
        return module, SineDataModule(shots=5, meta_batch_size=25, train_tasks_per_epoch=25 * steps, seed=0,
                                      num_workers=0)
    tasks, ways, queries = 8, 5, 15
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(tasks, ways, 1, 28, 28, generator=g), torch.randn(tasks, ways * queries, 1, 28, 28, generator=g)
    sy, qy = torch.arange(ways).expand(tasks, ways), torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    batch = TensorDataset(*(t.unsqueeze(0).expand(steps, *t.shape) for t in (sx, sy, qx, qy)))
    module = MetaSGDLightningModule(ConvNet4(out_features=ways), task="classification", init_lr=(0.005, 0.1))
    return module, DataLoader(batch, batch_size=None)


class Stopwatch:
    """Wraps methods so that the wall time spent inside them adds up (monitoring's own cost)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, obj, method: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(obj, method, timed)


def run(name: str, setting: str, steps: int, log_dir: str, stopwatch: Stopwatch | None = None) -> list[float]:
    module, data = workload(name, steps)
    timer = StepTimer()
    callbacks = [timer] + ([LearnedRateMonitor()] if setting == "tensorboard + α monitor" else [])
    logger = TensorBoardLogger(log_dir, name=name) if setting != "off" else False
    if stopwatch is not None and logger:
        # The monitor's hook and the logger's writes: what monitoring adds to a training step.
        stopwatch.wrap(logger, "log_metrics")
        for callback in callbacks[1:]:
            stopwatch.wrap(callback, "on_train_batch_end")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger, callbacks=callbacks,
                        inference_mode=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)
    return timer.times[10:]  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting, taken by turns")
    parser.add_argument("--sine-steps", type=int, default=1000)
    parser.add_argument("--conv-steps", type=int, default=110)
    parser.add_argument("--conv-rounds", type=int, default=1, help="runs of each setting for ConvNet4")
    args = parser.parse_args()
    silence_lightning_noise()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, lightning {L.__version__}; "
          f"log_every_n_steps 50, LearnedRateMonitor every 100 steps with histograms")
    for name, steps in (("sine", args.sine_steps), ("convnet4", args.conv_steps)):
        rounds = args.rounds if name == "sine" else args.conv_rounds
        times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
        stopwatch = Stopwatch()
        with tempfile.TemporaryDirectory() as log_dir:
            for _ in range(rounds):
                for setting in SETTINGS:
                    watch = stopwatch if setting == SETTINGS[-1] else None
                    times[setting] += run(name, setting, steps, log_dir, watch)
        # The mean, not the median: monitoring costs on a few steps only, and the mean is what a run pays.
        base = statistics.fmean(times["off"])
        print(f"\n{name}: {steps} steps per run, {rounds} runs per setting")
        for setting in SETTINGS:
            mean = statistics.fmean(times[setting])
            print(f"  {setting:24s} {1e3 * mean:8.2f} ms/step   {100 * (mean / base - 1):+5.1f}% vs off")
        # Wall-clock differences between runs are within the machine's noise; the time spent inside the
        # monitoring code itself is the precise figure.
        per_step = stopwatch.seconds / (rounds * steps)
        share = per_step / statistics.fmean(times[SETTINGS[-1]])
        print(f"  time inside the α monitor and the logger's writes: {1e3 * per_step:.3f} ms/step, "
              f"{100 * share:.2f}% of the monitored runs' step time")

if __name__ == "__main__":
    main()
