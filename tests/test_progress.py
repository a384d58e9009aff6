"""Progress output of ``metasgd``: a live bar in a terminal, plain lines when piped, on in every shipped config."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest
import yaml

from conftest import REPO, run_in_process
from metasgd_lightning.training.progress import MetaProgressBar, _duration

TINY = ["--config", str(REPO / "configs/sine_5shot.yaml"), "--data.meta_batch_size", "4", "--data.val_tasks", "8",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.enable_model_summary", "false"]


def _in_terminal(args, cwd, timeout=300):
    """Run ``python -m metasgd_lightning ARGS`` with a pseudo-terminal as its standard output and error."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a new one is 0 columns wide
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "metasgd_lightning", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    output = b""
    while True:
        ready, _, _ = select.select([main], [], [], timeout)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for {timeout} s:\n{output.decode(errors='replace')}")
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


@pytest.mark.cost(7)  # seconds, for the order of the parallel run (conftest.py)
def test_a_terminal_gets_a_live_bar_with_step_metric_and_validation(tmp_path):
    output = _in_terminal(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "run")], cwd=tmp_path)
    assert "\r" in output.replace("\r\n", "\n")  # redrawn in place
    assert "Epoch 0" in output and "step=6" in output and "train/mse=" in output
    assert "Validation" in output  # validation draws a bar of its own
    assert "Final validation mse:" in output


def test_piped_output_is_one_line_now_and_then(tmp_path):
    proc = run_in_process("fit", *TINY, "--progress.line_every_n_steps", "2", "--trainer.default_root_dir",
                          str(tmp_path / "run"), cwd=tmp_path)
    out = proc.stdout
    assert "\r" not in out + proc.stderr and "it/s" not in out + proc.stderr  # no bar redrawn in a log
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], out
    assert all("train/mse" in line and "tasks/s" in line and "ETA" in line for line in lines), lines
    assert "validation at step 3 done" in out and "validation at step 6 done" in out and "val/mse" in out
    assert "training ended at step 6: 24 tasks in " in out and "tasks/s" in out.split("training ended")[1]


def test_enable_progress_bar_false_still_switches_it_off(tmp_path):
    proc = run_in_process("fit", *TINY, "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir",
                          str(tmp_path / "run"), cwd=tmp_path)
    assert "step 6/6" not in proc.stdout and "validation at step" not in proc.stdout
    assert "Final validation mse:" in proc.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_shows_progress_and_keeps_checkpoints_under_its_run_folder(config):
    settings = yaml.safe_load((REPO / "configs" / config).read_text())
    assert settings["trainer"].get("enable_progress_bar", True) is not False
    assert (settings.get("checkpoint") or {}).get("dirpath") is None  # <default_root_dir>/checkpoints


def test_line_mode_follows_the_output_unless_told():
    assert MetaProgressBar(terminal=False).lines and not MetaProgressBar(terminal=True).lines
    assert MetaProgressBar().lines  # pytest captures standard output: not a terminal
    with pytest.raises(ValueError, match="line_every_n_steps"):
        MetaProgressBar(line_every_n_steps=0)
    with pytest.raises(ValueError, match="line_every_seconds"):
        MetaProgressBar(line_every_seconds=0)
    assert [_duration(s) for s in (0.25, 42, 125, 7300)] == ["0.2s", "42s", "2m05s", "2h01m"]
