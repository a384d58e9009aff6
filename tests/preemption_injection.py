"""Stop signals on cue in a chosen phase, for tests/test_preemption.py (passed with ``--trainer.callbacks+=``).

``SignalIn(phase, signal, group)`` sends ``signal`` to the run's process (or, with ``group``, to its whole
process group, DataLoader workers included, as a job scheduler does) once, in ``phase``: ``"setup"`` (the
callbacks' set-up, after the data module's), ``"sanity"`` (the first sanity-check batch), ``"train"`` (the start
of training step ``step``), ``"validation"`` (batch ``batch`` of the first validation inside fit) or ``"test"``.
"""

from __future__ import annotations

import os
import signal as signals

import lightning as L


class SignalIn(L.Callback):
    def __init__(self, phase: str, signal: str = "SIGTERM", group: bool = False, step: int = 1, batch: int = 1) -> None:
        self.phase, self.signum, self.group, self.step, self.batch = phase, getattr(signals, signal), group, step, batch
        self.sent = False

    def _send(self, phase: str) -> None:
        if phase != self.phase or self.sent:
            return
        self.sent = True
        print(f"sending {signals.Signals(self.signum).name} in {phase}", flush=True)
        if self.group:
            os.killpg(os.getpgid(0), self.signum)
        else:
            os.kill(os.getpid(), self.signum)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._send("setup")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:  # global_step counts finished steps
            self._send("train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            self._send("sanity")
        elif batch_idx == self.batch:
            self._send("validation")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._send("test")
