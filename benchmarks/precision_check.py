"""Short meta-training runs under each Lightning precision: does it learn, and how fast is a step.

For each precision (``32-true``, ``bf16-mixed``, ``16-mixed`` by default):

* sine regression, 5-shot, meta-batch 25, one inner step, ``--steps`` meta-steps, then the test MSE ±
  95% interval on the same 600 fixed tasks (does it learn as well as float32?);
* the Omniglot-sized ConvNet4 (64 channels, 28x28, 5-way 1-shot, 15 queries per class, 32 tasks per
  step, second order) on random data of the real shapes: tasks per second over ``--conv-steps`` steps
  after two warm-up steps (what does the precision buy?).

    python -m benchmarks.precision_check                       # CPU (16-mixed runs without a loss scaler there)
    python -m benchmarks.precision_check --accelerator gpu     # on a GPU (16-mixed with Lightning's GradScaler)
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules import SineDataModule
from metasgd_lightning import ConvNet4, MetaSGDLightningModule, SineMLP
from metasgd_lightning.commands._quiet import silence_lightning_noise

REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time of each training step, from the end of the previous one (the GPU synchronised)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def trainer(args, precision: str, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator=args.accelerator, devices=1, precision=precision, inference_mode=False, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, **kwargs)


def sine_run(args, precision: str) -> tuple[float, float, float]:
    L.seed_everything(0, verbose=False)
    data = SineDataModule(shots=5, queries=10, meta_batch_size=25, train_tasks_per_epoch=25 * args.steps,
                          val_tasks=25, test_tasks=600, seed=0)
    module = MetaSGDLightningModule(SineMLP(), task="regression", init_lr=(0.005, 0.1))
    start = time.perf_counter()
    trainer(args, precision, max_steps=args.steps).fit(module, data)
    seconds = time.perf_counter() - start
    metrics = trainer(args, precision).test(module, data, verbose=False)[0]
    return metrics["test/mse"], metrics["test/mse_ci95"], seconds


def conv_tasks_per_second(args, precision: str) -> float:
    ways, queries, tasks = 5, 15, args.tasks
    g = torch.Generator().manual_seed(0)
    steps = args.conv_steps + 2
    sx = torch.randn(steps * tasks, ways, 1, 28, 28, generator=g)
    qx = torch.randn(steps * tasks, ways * queries, 1, 28, 28, generator=g)
    sy = torch.arange(ways).expand(steps * tasks, ways)
    qy = torch.arange(ways).repeat_interleave(queries).expand(steps * tasks, ways * queries)
    loader = DataLoader(TensorDataset(sx, sy, qx, qy), batch_size=tasks)
    module = MetaSGDLightningModule(ConvNet4(out_features=ways), task="classification", init_lr=0.4)
    timer = StepTimer()
    trainer(args, precision, max_steps=steps, callbacks=[timer]).fit(module, loader)
    timed = sorted(timer.times[1:])  # the first interval still warms up
    return tasks / timed[len(timed) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--steps", type=int, default=500, help="sine meta-training steps per precision")
    parser.add_argument("--conv-steps", type=int, default=6, help="timed ConvNet4 steps per precision")
    parser.add_argument("--tasks", type=int, default=32, help="ConvNet4 tasks per meta-batch")
    args = parser.parse_args()
    silence_lightning_noise()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    print(f"device {device}, torch {torch.__version__}, lightning {L.__version__}")
    print(f"| precision | sine 5-shot test MSE ± 95% CI ({args.steps} steps) | sine training s | ConvNet4 tasks/s "
          f"(5-way 1-shot, {args.tasks} tasks, second order) |\n| --- | --- | --- | --- |")
    for precision in args.precisions:
        mse, ci95, seconds = sine_run(args, precision)
        rate = conv_tasks_per_second(args, precision)
        print(f"| {precision} | {mse:.3f} ± {ci95:.3f} | {seconds:.0f} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
