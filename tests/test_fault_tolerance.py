"""Long runs: a killed or preempted ``metasgd fit`` resumes exactly, and checkpoints survive crashes.

The runs are real ``metasgd fit`` processes on tiny sine settings: 6 steps of 4 tasks per epoch,
``max_steps`` 10 (inside the second epoch), ``last.ckpt`` every 4 steps and at every validation (the
end of each epoch). Faults come on cue from the callbacks of ``tests/fault_injection.py``. A run that
was killed and resumed must end with the θ, α and Adam state of the run that never stopped, bit for
bit (on CPU; the DDP run, whose gradients are averaged by an all-reduce, to float rounding).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

import fixtures_episodic as fx
from conftest import once_per_session, run_in_process
from datamodules import ImageFolderDataModule, SineDataModule
from datamodules.episodic import ImageReadError
from datamodules.sampling import TaskDataLoader, TaskIndexSampler
from forked_python import run_python
from metasgd_lightning import ConvNet4, MetaSGDLightningModule
from metasgd_lightning.training.callbacks import MetaSGDCheckpoint
from metasgd_lightning.training.checkpointing import (
    AtomicCheckpointIO,
    CheckpointCorruptError,
    checkpoint_is_intact,
    resolve_resume_path,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SMALL = ["--data.meta_batch_size", "4", "--data.train_tasks_per_epoch", "24", "--data.val_tasks", "8",
         "--trainer.max_steps", "10", "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
         "--lr_monitor.every_n_steps", "0", "--checkpoint.last_every_n_steps", "4"]


def _fit(run: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``metasgd fit`` on the sine config in its own process group (so a fault can signal all its processes)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "PYTHONWARNINGS": "ignore"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)
    return run_python(["-m", "metasgd_lightning", *_fit_args(run, *extra)], cwd=run.parent, env=env, timeout=timeout)


def _fit_args(run: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/sine_5shot.yaml"), *SMALL, "--trainer.default_root_dir", str(run),
            "--checkpoint.dirpath", str(run / "ckpt"), *extra]


def _fault(name: str, **init_args) -> list[str]:
    return ["--trainer.callbacks+=" + json.dumps({"class_path": f"fault_injection.{name}", "init_args": init_args})]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_training_state(actual: dict, expected: dict, exact: bool = True) -> None:
    """θ and α, Adam's moments and steps, the scheduler and the place in the task stream."""
    assert actual["global_step"] == expected["global_step"]
    compare = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7))
    weights = [k for k in expected["state_dict"] if k.startswith("meta_learner.")]
    assert weights and actual["state_dict"].keys() == expected["state_dict"].keys()
    for key in weights:
        assert compare(actual["state_dict"][key], expected["state_dict"][key]), key
    (got,), (want,) = actual["optimizer_states"], expected["optimizer_states"]
    assert got["state"].keys() == want["state"].keys()
    for index, state in want["state"].items():
        for name, value in state.items():
            assert compare(got["state"][index][name], value), (index, name)
    assert got["param_groups"] == want["param_groups"]
    assert actual["lr_schedulers"] == expected["lr_schedulers"]
    loader = actual["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader["epoch"], loader["start"]) == (1, 16)  # epoch 2, after its 4th step of 4 tasks


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The run that never stops, started with ``--ckpt_path last`` in an empty folder."""

    def make(folder: Path):
        run = folder / "run"
        run.mkdir()
        proc = _ok(_fit(run, "--ckpt_path", "last"))
        return run, proc, _load(run / "ckpt" / "last.ckpt")

    return once_per_session(tmp_path_factory, "fault-tolerance-reference", make)


@pytest.mark.cost(5)  # seconds, for the order of the parallel run (conftest.py)
def test_a_run_stopped_by_max_steps_inside_its_second_epoch_saves_that_step(reference):
    run, proc, last = reference
    assert last["global_step"] == 10
    output = proc.stdout + proc.stderr
    starts = [line for line in output.splitlines() if "--ckpt_path last" in line]
    assert starts == [f"--ckpt_path last: no checkpoint in {run / 'ckpt'} yet, so training starts from scratch."]
    assert "could not find the monitored key" not in output
    # The final validation scored the step-10 weights inside fit: ranked among the best, and last.ckpt is them.
    assert "Final validation mse:" in proc.stdout
    assert f"Checkpoints: {run / 'ckpt'} (last.ckpt; best: best-step=10.ckpt)" in proc.stdout  # the best here
    state = next(v for k, v in last["callbacks"].items() if k.startswith("MetaSGDCheckpoint"))
    final_mse = float(proc.stdout.split("Final validation mse: ")[1].split()[0])
    assert float(state["best_model_score"]) == pytest.approx(final_mse, abs=5e-5)
    best = _load(run / "ckpt" / "best-step=10.ckpt")
    assert all(torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items())


@pytest.mark.cost(2)  # seconds, for the order of the parallel run (conftest.py)
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_inside_an_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, reference, workers):
    run = tmp_path / "run"
    run.mkdir()
    options = ["--data.num_workers", str(workers)]
    killed = _fit(run, *options, *_fault("SignalAt", step=9, signal="SIGKILL", group=True))
    assert killed.returncode == -signal.SIGKILL
    assert _load(run / "ckpt" / "last.ckpt")["global_step"] == 8  # the kill lost step 9
    resumed = _ok(_fit(run, *options, "--ckpt_path", "last"))
    restoring = f"Restoring states from the checkpoint path at {run / 'ckpt' / 'last.ckpt'}"
    assert restoring in resumed.stdout + resumed.stderr
    _assert_same_training_state(_load(run / "ckpt" / "last.ckpt"), reference[2])


@pytest.mark.cost(7)  # seconds, for the order of the parallel run (conftest.py)
def test_two_ddp_processes_killed_mid_epoch_resume_on_one(tmp_path, reference):
    run = tmp_path / "run"
    run.mkdir()
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--data.meta_batch_size", "2"]  # 2 x 2 tasks per step, as the reference's 4
    killed = _fit(run, *ddp, *_fault("SignalAt", step=9, signal="SIGKILL", group=True), timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = _load(run / "ckpt" / "last.ckpt")
    assert saved["global_step"] == 8
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["start"] == 8  # global tasks of epoch 2
    _ok(_fit(run, "--ckpt_path", "last"))  # one process, meta-batch 4
    _assert_same_training_state(_load(run / "ckpt" / "last.ckpt"), reference[2], exact=False)


@pytest.mark.cost(3)  # seconds, for the order of the parallel run (conftest.py)
def test_sigterm_saves_at_the_end_of_the_step_and_resumes_exactly(tmp_path, reference):
    run = tmp_path / "run"
    run.mkdir()
    options = ["--data.num_workers", "2"]  # the signal goes to the workers too, as a scheduler's does
    stopped = _fit(run, *options, *_fault("SignalAt", step=9, signal="SIGTERM", group=True, during=True))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "SIGTERM received: saving a checkpoint at the end of this step, then stopping." in stopped.stderr
    assert f"Stopped by SIGTERM at step 9: saved {run / 'ckpt' / 'last.ckpt'}" in stopped.stdout + stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert _load(run / "ckpt" / "last.ckpt")["global_step"] == 9  # the step it was in, finished and saved
    _ok(_fit(run, *options, "--ckpt_path", "last"))
    _assert_same_training_state(_load(run / "ckpt" / "last.ckpt"), reference[2])


@pytest.mark.cost(1)  # seconds, for the order of the parallel run (conftest.py)
def test_a_kill_while_the_checkpoint_is_written_leaves_the_previous_one(tmp_path, reference):
    run = tmp_path / "run"
    run.mkdir()
    folder = run / "ckpt"
    killed = _fit(run, *_fault("KilledWhileWriting", step=8, folder=str(folder)))
    assert killed.returncode == -signal.SIGXFSZ  # killed in the middle of writing step 8's last.ckpt
    (stray,) = folder.glob(".last.ckpt.*.tmp")
    assert not checkpoint_is_intact(stray)
    assert checkpoint_is_intact(folder / "last.ckpt")
    assert _load(folder / "last.ckpt")["global_step"] == 6  # the save at the end of epoch 1
    AtomicCheckpointIO().save_checkpoint(_load(folder / "last.ckpt"), folder / "last.ckpt")
    assert not list(folder.glob(".last.ckpt.*.tmp"))  # the next save of last.ckpt removes the stray file


def test_a_truncated_checkpoint_is_named_with_the_newest_intact_one_beside_it(tmp_path, reference):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    intact = folder / "best-step=6.ckpt"
    intact.write_bytes((reference[0] / "ckpt" / "last.ckpt").read_bytes())
    broken = folder / "last.ckpt"
    broken.write_bytes(intact.read_bytes()[:20_000])
    proc = run_in_process(*_fit_args(tmp_path / "run", "--ckpt_path", str(broken)), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"metasgd fit: Checkpoint {broken} is truncated or corrupt. The newest intact checkpoint beside it is "
            f"{intact}: resume with --ckpt_path {intact}.") in proc.stderr
    with pytest.raises(CheckpointCorruptError, match=f"newest intact checkpoint beside it is {intact}"):
        resolve_resume_path("last", folder)  # what `--ckpt_path last` meets in this folder


@pytest.mark.cost(2)  # seconds, for the order of the parallel run (conftest.py)
def test_a_dead_dataloader_worker_is_named_and_the_last_checkpoint_stays(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _fit(run, "--data.num_workers", "2", *_fault("KillWorkerAt", step=5))
    assert proc.returncode == 1
    assert "DataLoader worker (pid" in proc.stderr
    # The batches the workers prepared ahead arrive first: the error comes a few steps after the kill.
    saved = _load(run / "ckpt" / "last.ckpt")["global_step"]
    assert saved in (4, 6, 8)  # every 4 steps and at the end of epoch 1
    assert f"the last checkpoint, {run / 'ckpt' / 'last.ckpt'} (step {saved}), is intact" in proc.stderr


def test_a_worker_killed_while_handing_over_a_batch_is_named_not_a_bare_connection_error(tmp_path):
    # The race the test above can meet: the hand-over breaks before PyTorch finds the worker gone. Played in a
    # process of its own, whose only children are the ones it starts.
    (tmp_path / "race.py").write_text(textwrap.dedent("""
        import os, signal, subprocess, sys
        from datamodules.sampling import _NamesKilledWorker

        class BrokenHandOver:
            def __next__(self):
                raise ConnectionResetError(104, "Connection reset by peer")

        for kill in (False, True):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            if kill:
                os.kill(child.pid, signal.SIGKILL)  # left unreaped, as a dying worker is
            try:
                next(_NamesKilledWorker(BrokenHandOver(), wait=0.2))
            except Exception as error:
                print(child.pid, type(error).__name__, error, sep=" | ")
            child.kill()
            child.wait()
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = run_python([tmp_path / "race.py"], cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (alive, kind, message), (killed, kind_killed, message_killed) = (line.split(" | ") for line in proc.stdout.splitlines())
    assert (kind, message) == ("ConnectionResetError", "[Errno 104] Connection reset by peer")  # no killed worker
    assert kind_killed == "RuntimeError" and message_killed.startswith(
        f"DataLoader worker (pid {killed}) is killed by signal: SIGKILL, while handing over a batch (ConnectionResetError:")


# -- in one process ----------------------------------------------------------------------------------


def test_an_image_that_becomes_unreadable_is_named_and_the_last_checkpoint_stays(tmp_path):
    root = fx.image_folder(tmp_path / "images", classes=12, size=8, nested=False)
    data = ImageFolderDataModule(root=str(root), image_size=8, channels=1, ways=3, shots=1, queries=1,
                                 meta_batch_size=2, train_tasks_per_epoch=40, val_tasks=4, test_tasks=4,
                                 fractions=(0.5, 0.25, 0.25), num_workers=1)
    module = MetaSGDLightningModule(ConvNet4(out_features=3, hidden_channels=4, image_size=8, downsample="stride"))
    from fault_injection import SpoilImagesAt

    checkpoint = MetaSGDCheckpoint(dirpath=tmp_path / "ckpt", last_every_n_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=15, limit_val_batches=0, inference_mode=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[SpoilImagesAt(step=2, root=str(root)), checkpoint])
    with pytest.raises(ImageReadError, match=rf"Cannot read image {root}/class_\d+/\d\.png"):
        trainer.fit(module, data)
    last = _load(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] >= 2 and last["global_step"] % 2 == 0


def test_the_loader_state_counts_global_tasks_and_continues_on_another_number_of_processes():
    data = SineDataModule(meta_batch_size=2, train_tasks_per_epoch=24)
    data.setup("fit")
    ranks = []
    for rank in range(2):  # two processes, one step each
        loader = TaskDataLoader(data.tasks("train", 24), batch_size=2, sampler=TaskIndexSampler(24, 2, rank))
        loader.sampler.set_epoch(1)
        iterator = iter(loader)
        ranks.append(next(iterator))
        state = loader.state_dict()
    assert state == {"epoch": 1, "start": 4, "tasks_per_epoch": 24, "world_size": 2, "meta_batch_size": 2}
    one = SineDataModule(meta_batch_size=4, train_tasks_per_epoch=24)
    one.setup("fit")
    resumed = one.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning's call at the start of the resumed epoch keeps the place
    rest = list(resumed)
    assert len(resumed) == 6 and len(rest) == 5  # the epoch's length stays, its first step is done
    uninterrupted = one.train_dataloader()
    uninterrupted.sampler.set_epoch(1)
    expected = list(uninterrupted)
    first = torch.cat([ranks[0][0], ranks[1][0]]).flatten().sort().values
    assert torch.equal(first, expected[0][0].flatten().sort().values)
    for got, want in zip(rest, expected[1:]):
        assert torch.equal(got[0], want[0])
    resumed.sampler.set_epoch(2)  # a state meant for epoch 1 does not carry into epoch 2
    assert list(resumed.sampler) == list(range(48, 72))
    sampler = TaskIndexSampler(24)
    sampler.load_state_dict({"epoch": 3, "start": 20, "tasks_per_epoch": 24})
    assert list(sampler) == list(range(92, 96)) and len(sampler) == 24


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def broken_save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind either
    assert io.load_checkpoint(path)["step"] == 1
    path.write_bytes(path.read_bytes()[:-30])  # truncated by something else
    with pytest.raises(CheckpointCorruptError, match=r"last\.ckpt is truncated or corrupt.*no intact checkpoint"):
        io.load_checkpoint(path)
    assert resolve_resume_path("last", tmp_path / "empty") is None
    with pytest.raises(CheckpointCorruptError):
        resolve_resume_path("last", tmp_path)
    assert resolve_resume_path(None, tmp_path) is None and resolve_resume_path("best", tmp_path) == "best"


@pytest.mark.parametrize("kwargs, message", [
    (dict(last_every_minutes=0), "`last_every_minutes` must be a positive number"),
    (dict(last_every_n_steps=-1), "last_every_n_steps"),
    (dict(stop_signals=["SIGTERM", "SIGNOPE"]), r"unknown here: \['SIGNOPE'\]"),
    (dict(save_last="link"), "use save_last=True"),
])
def test_bad_checkpoint_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaSGDCheckpoint(**kwargs)
