"""Several processes on CPU (gloo): the same tasks, weights and metrics as one process.

``meta_batch_size`` is per device: W processes with meta-batch b take the same optimiser steps, over
the same tasks, as one process with meta-batch W * b. Each run is a real multi-process run of
``tests/ddp_script.py`` (Lightning's DDP launcher, or torchrun for two "nodes" on loopback); every
rank writes what it saw to ``rank{r}.pt``. The one-process runs they are compared with run the same script in the
test's process.
"""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import once_per_session
from datamodules.sampling import FixedTaskSampler, TaskIndexSampler
from forked_python import run_python

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "ddp_script.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMEOUT = 150


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        env.pop(name, None)  # a launcher's variables must not leak into these runs
    return env


def _run(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_python([str(SCRIPT), "--out", str(out), *args], cwd=REPO, env=_env(), timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{SCRIPT.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_one_process(out: Path, *args: str) -> None:
    """``ddp_script.py --devices 1 ARGS`` by its ``main`` in this process: the one-process runs the DDP runs are
    compared with need no launcher, and a second interpreter costs seconds of imports."""
    assert "--devices" not in args and "--num-nodes" not in args
    script = runpy.run_path(str(SCRIPT))  # its definitions; main() is not run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(SCRIPT), "--out", str(out), "--devices", "1", *args])
        script["main"]()


def _records(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_weights_close(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=atol, msg=name)


@pytest.fixture(scope="session")
def single(tmp_path_factory):
    """One process, meta-batch 4, five steps (tasks 0-3, 4-7, 8-11 in epoch 0; 12-15, 16-19 in epoch 1)."""

    def make(out: Path) -> dict:
        _run_one_process(out, "--meta-batch-size", "4", "--max-steps", "5")
        (record,) = _records(out, 1)
        return record

    return once_per_session(tmp_path_factory, "ddp-single", make)


@pytest.fixture(scope="session")
def ddp(tmp_path_factory):
    """Two processes, meta-batch 2 each, three steps, a checkpoint after every step."""

    def make(out: Path) -> tuple[Path, list[dict]]:
        _run(out, "--devices", "2", "--meta-batch-size", "2", "--max-steps", "3", "--save-ckpt")
        return out, _records(out, 2)

    return once_per_session(tmp_path_factory, "ddp-two-processes", make)


# -- the samplers alone ------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_sampler_shares_make_up_the_single_process_meta_batches(world):
    per_device, n = 2, 24
    single = list(TaskIndexSampler(n))
    shares = [TaskIndexSampler(n, num_replicas=world, rank=r) for r in range(world)]
    for s in shares:
        s.set_epoch(1)
    streams = [list(s) for s in shares]
    assert all(len(s) == len(stream) == n // world for s, stream in zip(shares, streams))
    for step in range(n // (world * per_device)):
        together = sorted(i for stream in streams for i in stream[step * per_device:(step + 1) * per_device])
        # epoch 1 of one process with a meta-batch of world * per_device tasks
        assert together == [n + i for i in single[step * world * per_device:(step + 1) * world * per_device]]


def test_fixed_sampler_splits_without_padding():
    shares = [list(FixedTaskSampler(7, num_replicas=2, rank=r)) for r in range(2)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5]]
    assert len(FixedTaskSampler(7, num_replicas=2, rank=1)) == 3
    assert list(FixedTaskSampler(7)) == list(range(7))  # no process group: everything
    with pytest.raises(ValueError, match="at least one task"):
        list(FixedTaskSampler(2, num_replicas=3, rank=0))


# -- real multi-process runs -------------------------------------------------------------------------


@pytest.mark.cost(9)  # seconds, for the order of the parallel run (conftest.py)
def test_ddp_ranks_split_each_global_meta_batch(single, ddp):
    _, ranks = ddp
    assert [r["world_size"] for r in ranks] == [2, 2]
    for step in range(3):
        first, second = (r["train_tasks"][step] for r in ranks)
        assert len(first) == len(second) == 2
        assert not set(first) & set(second)
        assert sorted(first + second) == sorted(single["train_tasks"][step])


def test_ddp_gives_the_weights_of_one_process_with_the_whole_meta_batch(single, ddp):
    _, ranks = ddp
    for step in (1, 2, 3):
        _assert_weights_close(ranks[0]["weights"][step], single["weights"][step])
        _assert_weights_close(ranks[1]["weights"][step], ranks[0]["weights"][step], atol=0)  # replicas agree
    # the comparison has teeth: three steps moved θ and α far more than the tolerance
    moved = max((single["weights"][3][k] - single["start_weights"][k]).abs().max() for k in single["start_weights"])
    assert moved > 1e-3


def test_ddp_validation_counts_each_task_once(single, ddp):
    _, ranks = ddp
    val_tasks = [t for r in ranks for t in r["val_tasks"]]
    assert len(val_tasks) == len(set(val_tasks)) == 7  # 4 + 3: no task repeated to even the ranks out
    assert sorted(val_tasks) == sorted(single["val_tasks"])
    (expected,) = single["val"]
    for record in ranks:
        (result,) = record["val"]
        assert result["n"] == expected["n"] == 7
        for key in ("mean", "ci95", "std"):
            assert result[key] == pytest.approx(expected[key], rel=1e-12), key


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the run sets no checkpoint callback
@pytest.mark.cost(2)  # seconds, for the order of the parallel run (conftest.py)
def test_ddp_checkpoint_resumes_on_one_process(tmp_path, single, ddp):
    out, ranks = ddp
    _run_one_process(tmp_path, "--meta-batch-size", "4", "--max-steps", "5", "--no-validate",
                     "--ckpt-path", str(out / "last.ckpt"))
    (resumed,) = _records(tmp_path, 1)
    assert resumed["start_step"] == 3
    _assert_weights_close(resumed["start_weights"], ranks[0]["weights"][3], atol=0)
    # the next steps meet the tasks, and reach the weights, of the uninterrupted single-process run
    assert resumed["train_tasks"] == {step: single["train_tasks"][step] for step in (3, 4)}
    _assert_weights_close(resumed["weights"][5], single["weights"][5])


@pytest.mark.cost(5)  # seconds, for the order of the parallel run (conftest.py)
def test_ddp_with_a_backward_per_task_gives_the_same_weights(tmp_path, single):
    # Each rank backpropagates task by task; only its last backward of a step all-reduces (DDP no_sync).
    _run(tmp_path, "--devices", "2", "--meta-batch-size", "2", "--max-steps", "3", "--no-validate",
         "--tasks-per-backward", "1")
    for record in _records(tmp_path, 2):
        _assert_weights_close(record["weights"][3], single["weights"][3])


@pytest.mark.cost(5)  # seconds, for the order of the parallel run (conftest.py)
@pytest.mark.parametrize("bad_rank", [0, 1])
def test_error_on_one_rank_ends_the_run(tmp_path, bad_rank):
    start = time.monotonic()
    proc = _run(tmp_path, "--devices", "2", "--meta-batch-size", "2", "--max-steps", "3", "--no-validate",
                "--nan-rank", str(bad_rank), "--nan-step", "1", check=False)
    assert time.monotonic() - start < TIMEOUT  # no deadlock (subprocess.run would raise on the timeout)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "InnerLoopDivergedError" in output and "training (global step 1)" in output, output[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cost(13)  # seconds, for the order of the parallel run (conftest.py)
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_two_nodes_on_loopback_give_the_single_process_weights(tmp_path, single):
    port = _free_port()
    launches = [
        subprocess.Popen(
            [str(TORCHRUN), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(SCRIPT), "--out", str(tmp_path), "--num-nodes", "2", "--devices", "1",
             "--meta-batch-size", "2", "--max-steps", "3", "--no-validate"],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    try:
        logs = [launch.communicate(timeout=TIMEOUT)[0] for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    assert [launch.returncode for launch in launches] == [0, 0], "\n".join(logs)[-5000:]
    ranks = _records(tmp_path, 2)
    assert [r["world_size"] for r in ranks] == [2, 2]
    for step in range(3):
        assert sorted(ranks[0]["train_tasks"][step] + ranks[1]["train_tasks"][step]) == sorted(single["train_tasks"][step])
    for record in ranks:
        _assert_weights_close(record["weights"][3], single["weights"][3])


# -- Reptile -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reptile_runs(tmp_path_factory):
    """Reptile: one process with meta-batch 4, and two with meta-batch 2 each, three steps."""
    runs = {}
    for name, devices, per_device in (("single", "1", "4"), ("ddp", "2", "2")):
        out = tmp_path_factory.mktemp(f"reptile_{name}")
        if devices == "1":
            _run_one_process(out, "--method", "reptile", "--meta-batch-size", per_device, "--max-steps", "3")
        else:
            _run(out, "--method", "reptile", "--devices", devices, "--meta-batch-size", per_device, "--max-steps", "3")
        runs[name] = _records(out, int(devices))
    return runs


@pytest.mark.cost(5)  # seconds, for the order of the parallel run (conftest.py)
def test_reptile_ddp_averages_over_all_ranks_tasks_as_one_process_with_the_whole_meta_batch(reptile_runs):
    (single,), ranks = reptile_runs["single"], reptile_runs["ddp"]
    for step in (1, 2, 3):
        assert sorted(ranks[0]["train_tasks"][step - 1] + ranks[1]["train_tasks"][step - 1]) == sorted(
            single["train_tasks"][step - 1])
        _assert_weights_close(ranks[0]["weights"][step], single["weights"][step])
        _assert_weights_close(ranks[1]["weights"][step], ranks[0]["weights"][step], atol=0)  # replicas agree
    moved = max((single["weights"][3][k] - single["start_weights"][k]).abs().max() for k in single["start_weights"])
    assert moved > 1e-3
    (expected,) = single["val"]  # evaluation with inner mini-batches: the same on one process and on two
    for record in ranks:
        (result,) = record["val"]
        assert result["n"] == expected["n"] == 7
        for key in ("mean", "ci95"):
            # float32 rounding: equal when both sides compute on one thread (make test), not otherwise
            assert result[key] == pytest.approx(expected[key], rel=1e-6), key
