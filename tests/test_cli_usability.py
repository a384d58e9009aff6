"""What a first-time user of ``metasgd`` meets: misspelt options refused by name, run folders that follow
``--trainer.default_root_dir``, absolute paths in the summary, and the command's own name in its usage.

The commands run in this process (``main`` or ``run_in_process``), except ``python -m metasgd_lightning --help``."""

import re
import shlex
from pathlib import Path

import pytest
import torch

import metasgd_lightning
from conftest import REPO, run_cli, run_in_process
from metasgd_lightning.commands.cli import main

SINE = str(REPO / "configs/sine_5shot.yaml")


@pytest.fixture(autouse=True)
def _command_line(monkeypatch):
    # main(args) is called as the console script calls it: pytest's own arguments are not the command's.
    monkeypatch.setattr("sys.argv", ["metasgd"])


@pytest.mark.parametrize("option, nearest", [
    ("--model.inner_step", "--model.inner_steps"),  # a prefix: argparse would take it for inner_steps
    ("--trainer.max_step", "--trainer.max_steps"),
    ("--data.shotz", "--data.shots"),  # an argument of the data module chosen by class_path
])
def test_a_misspelt_option_is_refused_in_one_line_with_the_nearest(option, nearest, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SINE, option, "5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"metasgd fit: unknown option {option}; did you mean {nearest}? (all options: metasgd fit --help)"


def test_a_misspelt_key_in_a_config_file_is_named_with_the_nearest(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    text = (REPO / "configs/sine_5shot.yaml").read_text()
    assert "\n  inner_steps:" in text  # else the "typo" would be no typo, and this would run the whole demo
    config.write_text(text.replace("\n  inner_steps:", "\n  inner_stepz:"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    assert "unknown option --model.inner_stepz; did you mean --model.inner_steps?" in capsys.readouterr().err


def test_other_errors_keep_jsonargparse_message(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", SINE, "--model.inner_steps", "many"])
    err = capsys.readouterr().err
    assert "inner_steps" in err and "did you mean" not in err


@pytest.mark.cost(2)  # seconds, for the order of the parallel run (conftest.py)
def test_python_dash_m_calls_itself_metasgd(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.stdout.startswith("usage: metasgd ") and "__main__.py" not in proc.stdout
    unwrapped = " ".join(re.sub(r"-\n\s*", "-", proc.stdout).split())  # argparse wraps the epilog, at hyphens too
    assert "Commands on a checkpoint, each with --help: adapt, plot-lrs, plot-sine, plot-tasks." in unwrapped
    # The commands on a checkpoint, by the entry point in this process, given the sys.argv[0] of `python -m`.
    program = str(Path(metasgd_lightning.__file__).with_name("__main__.py"))
    for command in ("adapt", "plot-lrs", "plot-sine", "plot-tasks"):
        proc = run_in_process(command, "--help", cwd=tmp_path, program=program)
        assert proc.stdout.startswith(f"usage: metasgd {command} ")


def test_default_root_dir_holds_logs_and_checkpoints_and_last_resumes_from_there(tmp_path):
    small = ["--data.meta_batch_size", "4", "--data.val_tasks", "8", "--trainer.enable_model_summary", "false",
             "--trainer.default_root_dir", "my_run"]  # relative to the working folder
    first = run_in_process("fit", "--config", SINE, *small, "--trainer.max_steps", "2", cwd=tmp_path)
    run = tmp_path / "my_run"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "lightning_logs" / "version_0").is_dir()
    assert not (tmp_path / "runs").exists()  # not the config's runs/sine_5shot
    # The summary names both folders with absolute paths, and a TensorBoard command that runs as pasted.
    assert f"TensorBoard logs: {run / 'lightning_logs' / 'version_0'}" in first.stdout
    assert f"Checkpoints: {run / 'checkpoints'} (last.ckpt" in first.stdout
    watch = next(line for line in first.stdout.splitlines() if line.startswith("Watch them: "))
    command = shlex.split(watch.removeprefix("Watch them: "))
    assert command[0].startswith("/") and command[-2:] == ["--logdir", str(run)]

    resumed = run_in_process("fit", "--config", SINE, *small, "--trainer.max_steps", "4", "--ckpt_path", "last",
                             cwd=tmp_path)
    assert f"Restoring states from the checkpoint path at {run / 'checkpoints' / 'last.ckpt'}" in resumed.stdout + resumed.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_checkpoint_dirpath_still_wins_over_default_root_dir(tmp_path):
    run_in_process("fit", "--config", SINE, "--data.meta_batch_size", "4", "--data.val_tasks", "8",
                   "--trainer.max_steps", "1", "--trainer.enable_model_summary", "false",
                   "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "elsewhere"),
                   cwd=tmp_path)
    assert (tmp_path / "elsewhere" / "last.ckpt").is_file() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_failed_download_into_a_missing_root_ends_in_one_message(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.omniglot as tv_omniglot

    def offline(url, download_root, filename=None, md5=None, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_omniglot, "download_and_extract_archive", offline)
    root = tmp_path / "dta" / "omniglot"  # a typo of data/omniglot; the config downloads
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs/omniglot_5way_1shot.yaml"), "--data.root", str(root),
              "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "run")])
    message = str(exit_.value.code)
    assert message.startswith("metasgd fit: Downloading Omniglot") and "network unreachable" in message
    assert f"The data folder {root} did not exist before this run" in message
    assert f"the data folder {root} does not exist" in capsys.readouterr().err  # said before the download
    assert not (tmp_path / "dta").exists()
