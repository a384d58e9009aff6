"""Preemption in every phase: SIGTERM, SIGUSR1 and Ctrl-C (SIGINT) stop a real ``metasgd`` run promptly.

Each phase is met in a real process, on tiny settings: set-up, the sanity check, a training step, a
validation (abandoned, not finished) and testing, on sine tasks and on a small Omniglot-layout image folder
read by two DataLoader workers, with the signal sent to the whole process group as job schedulers send it.
The run must exit with the signal's code (128 + its number), print its "Stopped by ..." line without a
traceback, and save ``last.ckpt`` where there is training state to save. Signals come on cue from
``tests/preemption_injection.py``. Each test has its own folder, so they can run in parallel (pytest-xdist).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import fixtures_episodic as fx
from forked_python import run_python

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
QUIET = ["--trainer.enable_model_summary", "false", "--trainer.logger", "false", "--lr_monitor.every_n_steps", "0"]
SINE = ["--config", str(REPO / "configs/sine_5shot.yaml"), "--data.meta_batch_size", "4",
        "--data.train_tasks_per_epoch", "24", "--data.val_tasks", "40", "--data.test_tasks", "40",
        "--trainer.max_steps", "12", *QUIET]


def _images(tmp_path: Path) -> list[str]:
    root = fx.omniglot_folder(tmp_path / "omni", alphabets=2, characters=8)
    return ["--config", str(REPO / "configs/omniglot_5way_1shot.yaml"), "--data.root", str(root),
            "--data.layout", "folder", "--data.fractions", "[0.5, 0.25, 0.25]", "--data.download", "false",
            "--data.ways", "3", "--data.meta_batch_size", "2", "--data.train_tasks_per_epoch", "8",
            "--data.val_tasks", "40", "--data.num_workers", "2", "--data.image_size", "12",
            "--model.model.init_args.image_size", "12", "--model.model.init_args.hidden_channels", "4",
            "--trainer.max_steps", "12", *QUIET]


def _run(run: Path, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``metasgd <command>`` in its own process group (a group signal reaches its workers, not pytest)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    args = [command, *args, "--trainer.default_root_dir", str(run), "--checkpoint.dirpath", str(run / "ckpt")]
    return run_python(["-m", "metasgd_lightning", *args], cwd=run.parent, env=env, timeout=timeout)


def _signal_in(phase: str, name: str, group: bool = False, **init_args) -> str:
    init_args = dict(init_args, phase=phase, signal=name, group=group)
    return "--trainer.callbacks+=" + json.dumps({"class_path": "preemption_injection.SignalIn", "init_args": init_args})


def _stopped(proc: subprocess.CompletedProcess, name: str) -> str:
    """The run's output, checked to be a clean stop by signal ``name``."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 128 + getattr(signal, name), f"exit {proc.returncode}:\n{output[-4000:]}"
    assert f"sending {name}" in proc.stdout
    assert "Traceback" not in output and "Error" not in output, output[-4000:]
    return output


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.cost(2)  # seconds, for the order of the parallel run (conftest.py)
def test_sine_set_up_and_sanity_check_stop_at_once_without_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = _stopped(_run(run, "fit", *SINE, _signal_in("setup", "SIGTERM")), "SIGTERM")
    assert "Stopped by SIGTERM during set-up at step 0: nothing trained yet, so no checkpoint was saved." in out
    out = _stopped(_run(run, "fit", *SINE, _signal_in("sanity", "SIGINT")), "SIGINT")
    assert "Stopped by SIGINT during the sanity check at step 0: nothing trained yet" in out
    assert "[rank: 0] Received SIGTERM" not in out
    assert not (run / "ckpt" / "last.ckpt").exists()


@pytest.mark.cost(4)  # seconds, for the order of the parallel run (conftest.py)
def test_sine_training_then_validation_then_testing(tmp_path):
    run, last = tmp_path / "run", tmp_path / "run" / "ckpt" / "last.ckpt"
    # SIGUSR1 inside training step 3: the step finishes, is saved, and the run stops.
    out = _stopped(_run(run, "fit", *SINE, _signal_in("train", "SIGUSR1", step=3)), "SIGUSR1")
    assert f"Stopped by SIGUSR1 at step 3: saved {last}." in out and _step(last) == 3
    # Resumed, then SIGTERM in the validation at the end of epoch 1 (step 6): abandoned at its next batch.
    out = _stopped(_run(run, "fit", *SINE, "--ckpt_path", "last", _signal_in("validation", "SIGTERM")), "SIGTERM")
    assert f"Restoring states from the checkpoint path at {last}" in out and f"Resumed from {last} at step 3." in out
    assert f"Stopped by SIGTERM at step 6 (the validation in progress was abandoned): saved {last}." in out
    assert "validation at step 6 done" not in out and _step(last) == 6
    # A resume goes on to the end.
    proc = _run(run, "fit", *SINE, "--ckpt_path", "last", "--checkpoint.stop_signals", "[]")
    assert proc.returncode == 0 and _step(last) == 12, proc.stderr[-3000:]
    # SIGTERM during `metasgd test`: stops at once, nothing to save.
    out = _stopped(_run(run, "test", *SINE, "--ckpt_path", str(last), _signal_in("test", "SIGTERM")), "SIGTERM")
    assert "Stopped by SIGTERM during testing: no result, and nothing to save" in out and _step(last) == 12


@pytest.mark.cost(5)  # seconds, for the order of the parallel run (conftest.py)
def test_images_with_workers_group_signals_in_sanity_check_validation_and_training(tmp_path):
    run, last = tmp_path / "run", tmp_path / "run" / "ckpt" / "last.ckpt"
    images = _images(tmp_path)
    # SIGUSR1 to the group (the workers too) in the sanity check: stops at once, nothing to save.
    out = _stopped(_run(run, "fit", *images, _signal_in("sanity", "SIGUSR1", group=True)), "SIGUSR1")
    assert "Stopped by SIGUSR1 during the sanity check at step 0: nothing trained yet" in out and not last.exists()
    # SIGTERM to the group during the first validation (step 4, epoch 1): abandoned, step 4 saved.
    out = _stopped(_run(run, "fit", *images, "--trainer.num_sanity_val_steps", "0",
                        _signal_in("validation", "SIGTERM", group=True)), "SIGTERM")
    assert "Stopped by SIGTERM at step 4" in out and f"saved {last}." in out
    assert "exited unexpectedly" not in out and _step(last) == 4
    # The resume says where it starts; Ctrl-C to the group inside step 6.
    out = _stopped(_run(run, "fit", *images, "--ckpt_path", "last", "--trainer.num_sanity_val_steps", "0",
                        _signal_in("train", "SIGINT", group=True, step=6)), "SIGINT")
    assert f"Resumed from {last} at step 4." in out
    assert f"Stopped by SIGINT at step 6: saved {last}." in out and _step(last) == 6


def test_a_note_when_threads_and_other_work_need_more_cores_than_there_are():
    from metasgd_lightning.training.progress import oversubscription_note

    note = oversubscription_note(threads=2, load=5.0, cores=2)
    assert note.startswith("Note: other work keeps about 4 of this machine's 2 cores busy and torch uses 2 threads")
    assert "OMP_NUM_THREADS=1" in note
    assert oversubscription_note(threads=1, load=5.0, cores=2) is None  # one thread: nothing to say
    assert oversubscription_note(threads=2, load=1.2, cores=2) is None  # only this run is busy
    assert oversubscription_note(threads=8, load=3.0, cores=16) is None  # room for both
