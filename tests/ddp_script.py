"""A small Meta-SGD sine run for the DDP tests (tests/test_ddp.py), one OS process per rank.

Run as a script, under Lightning's own DDP launcher (``--devices 2``: the script is started again for
rank 1) or under ``torchrun`` (``--num-nodes 2``, one process per node). Every rank writes what it
saw to ``OUT/rank{global_rank}.pt``: the tasks of each training step and of validation (by a
fingerprint, the first support input of each task), the validation metrics of the initial θ, and θ
and α at the start of training and after every step.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import SineDataModule
from metasgd_lightning import MetaSGDLightningModule, ReptileLightningModule
from metasgd_lightning.commands._quiet import silence_lightning_noise
from metasgd_lightning.methods.models import SineMLP


def _weights(module: MetaSGDLightningModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.meta_learner.named_parameters()}


class Recorder(L.Callback):
    """Records tasks, metrics and weights; optionally poisons one rank's batch with NaN."""

    def __init__(self, nan_rank: int | None, nan_step: int) -> None:
        self.nan_rank, self.nan_step = nan_rank, nan_step
        self.record: dict = {"train_tasks": {}, "weights": {}, "val_tasks": [], "val": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["start_step"] = trainer.global_step
        self.record["start_weights"] = _weights(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.record["train_tasks"][step] = batch[0][:, 0, 0].tolist()
        if trainer.global_rank == self.nan_rank and step == self.nan_step:
            batch[1][0, 0, 0] = float("nan")  # the support loss of this rank's first task becomes NaN

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["weights"][trainer.global_step] = _weights(pl_module)  # after the optimiser step

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["end_step"] = trainer.global_step
        self.record["end_weights"] = _weights(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.record["val_tasks"].extend(batch[0][:, 0, 0].tolist())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # Runs before the module's hook (which logs and resets the metric); compute() all-reduces.
        result = pl_module.metrics["val"]["mse"].compute()
        self.record["val"].append({k: float(v) for k, v in result.items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--meta-batch-size", type=int, default=4, help="tasks per meta-batch per device")
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--tasks-per-epoch", type=int, default=12)
    parser.add_argument("--val-tasks", type=int, default=7)
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint")
    parser.add_argument("--save-ckpt", action="store_true", help="keep OUT/last.ckpt, written after every step")
    parser.add_argument("--nan-rank", type=int, default=None, help="poison a batch on this global rank")
    parser.add_argument("--nan-step", type=int, default=1)
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--tasks-per-backward", type=int, default=None)
    parser.add_argument("--method", choices=["metasgd", "reptile"], default="metasgd")
    args = parser.parse_args()
    silence_lightning_noise()

    L.seed_everything(0, verbose=False)
    if args.method == "reptile":
        # Adam on mini-batches: a per-task optimiser state and a per-task batch order, neither tied to the rank.
        module = ReptileLightningModule(SineMLP(), task="regression", inner_steps=3, inner_lr=0.01,
                                        inner_optimizer="adam", inner_batch_size=6, eval_inner_steps=4,
                                        eval_inner_batch_size=3)
    else:
        module = MetaSGDLightningModule(SineMLP(), task="regression", init_lr=(0.005, 0.1), inner_steps=1,
                                        tasks_per_backward=args.tasks_per_backward)
    data = SineDataModule(shots=5, queries=10, meta_batch_size=args.meta_batch_size,
                          train_tasks_per_epoch=args.tasks_per_epoch, val_tasks=args.val_tasks,
                          test_tasks=args.val_tasks, seed=0)
    callbacks = [Recorder(args.nan_rank, args.nan_step)]
    if args.save_ckpt:
        callbacks.append(ModelCheckpoint(dirpath=args.out, save_last=True, save_top_k=0, every_n_train_steps=1))
    distributed = args.devices * args.num_nodes > 1
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes,
        strategy="ddp" if distributed else "auto",
        max_steps=args.max_steps, check_val_every_n_epoch=10_000, num_sanity_val_steps=0,
        inference_mode=False, logger=False, enable_checkpointing=args.save_ckpt, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=args.out,
    )
    if not args.no_validate:
        trainer.validate(module, data, verbose=False)  # the initial θ: the same on every run
    trainer.fit(module, data, ckpt_path=args.ckpt_path, weights_only=False)  # our own checkpoint
    callbacks[0].record["world_size"] = trainer.world_size
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(callbacks[0].record, args.out / f"rank{trainer.global_rank}.pt")
    print(f"rank {trainer.global_rank} of {trainer.world_size} done (pid {os.getpid()})", flush=True)


if __name__ == "__main__":
    main()
