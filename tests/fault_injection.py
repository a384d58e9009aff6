"""Faults on cue, for the fault-tolerance tests: callbacks passed to ``metasgd fit`` with ``--trainer.callbacks+=``.

Each acts at a chosen global step, so that a test kills, signals or starves a run at an exact place.
Only global rank 0 acts; signals go to the whole process group when ``group`` is set (a run started
with ``start_new_session=True`` is its own group: DDP ranks and DataLoader workers included).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
from pathlib import Path

import lightning as L


class SignalAt(L.Callback):
    """Sends ``signal`` (e.g. ``"SIGKILL"``, ``"SIGTERM"``) after training step ``step``, or during it (``during``)."""

    def __init__(self, step: int, signal: str = "SIGKILL", group: bool = False, during: bool = False) -> None:
        self.step, self.signum, self.group, self.during = step, getattr(globals()["signal"], signal), group, during

    def _send(self, trainer) -> None:
        if trainer.global_rank == 0:
            if self.group:
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.during and trainer.global_step == self.step - 1:  # global_step counts finished steps
            self._send(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.during and trainer.global_step == self.step:  # before the checkpoint callback saves this step
            self._send(trainer)


class KilledWhileWriting(L.Callback):
    """After step ``step``, the next file write past half the size of ``last.ckpt`` kills the process (SIGXFSZ).

    The checkpoint of that step is then cut off in the middle of being written, as by a kill or a
    power cut. (Python ignores SIGXFSZ and raises instead; its default action, restored here, kills.)
    """

    def __init__(self, step: int, folder: str) -> None:
        self.step, self.folder = step, Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            limit = (self.folder / "last.ckpt").stat().st_size // 2
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


class KillWorkerAt(L.Callback):
    """Kills one DataLoader worker process (SIGKILL, as the kernel's out-of-memory killer does) after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            workers = multiprocessing.active_children()
            assert workers, "no DataLoader worker to kill: run with --data.num_workers > 0"
            os.kill(workers[0].pid, signal.SIGKILL)


class SpoilImagesAt(L.Callback):
    """Overwrites every ``.png`` under ``root`` with bytes no decoder reads, after step ``step``."""

    def __init__(self, step: int, root: str) -> None:
        self.step, self.root = step, Path(root)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for path in self.root.rglob("*.png"):
                path.write_bytes(b"not an image")
