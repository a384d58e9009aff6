"""Every everyday mistake with ``metasgd`` ends in one line, ``metasgd <command>: ...``, and a non-zero exit;
a bug of ours keeps its traceback; and no mistake passes silently (issues 20 and 23)."""

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, run_cli
from datamodules import SineDataModule
from metasgd_lightning import MetaSGDLightningModule
from metasgd_lightning.commands import cli
from metasgd_lightning.commands.cli import main
from metasgd_lightning.methods.models import ConvNet4, SineMLP
from metasgd_lightning.training.base import SetupError
from metasgd_lightning.training.checkpointing import best_checkpoint

SINE = str(REPO / "configs/sine_5shot.yaml")
OMNIGLOT = str(REPO / "configs/omniglot_5way_1shot.yaml")
TINY = ["--data.meta_batch_size", "2", "--data.val_tasks", "2", "--data.test_tasks", "2",
        "--trainer.enable_model_summary", "false", "--progress.refresh_rate", "0", "--trainer.logger", "false"]


@pytest.fixture(autouse=True)
def _command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["metasgd"])
    monkeypatch.delenv("METASGD_TRACEBACK", raising=False)


def one_line(args, capsys) -> str:
    """Run ``metasgd ARGS`` in-process; its only output line, after checking that it exits non-zero."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    code = exit_.value.code
    out = capsys.readouterr()
    text = out.out + out.err + (code if isinstance(code, str) else "")
    assert code not in (0, None)
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("extra, expected", [
    (["--model.inner_steps", "-1"], "metasgd fit: `inner_steps` must be a positive integer; got -1."),
    (["--data.shots", "0"], "metasgd fit: SineDataModule `shots` must be an integer >= 1; got 0."),
    (["--model.init_lr", ".nan"], "metasgd fit: `init_lr` must be finite; got nan."),
    (["--model.init_lr", "-1"], "metasgd fit: `init_lr` must be 0 or more: the inner step is θ − α ⊙ ∇L; got -1.0."),
    (["--model.init_lr", "nan"], "metasgd fit: --model.init_lr expects float or tuple[float, float]; got 'nan'"),
    (["--model.inner_steps", "many"], "metasgd fit: --model.inner_steps expects int; got 'many'"),
    (["--data.shots", "x"], "metasgd fit: --data.shots expects int; got 'x'"),
    (["--trainer.max_steps", "-5"], "metasgd fit: `max_steps` must be a non-negative integer or -1"),
    (["--ckpt_path", "nope.ckpt"], "metasgd fit: --ckpt_path nope.ckpt: no such file."),
    (["--model", "metasgd_lightning.ReptileLightningModule"], "metasgd fit: --model metasgd_lightning.ReptileLightningModule "
     f"names the module's class, but {SINE} gives Meta-SGD's settings (`model:` without class_path), which another class "
     "cannot take. Use a config of that method (e.g. configs/reptile_sine.yaml"),
    (["--model", "{class_path: metasgd_lightning.MAMLLightningModule}"],
     "metasgd fit: --model {class_path: metasgd_lightning.MAMLLightningModule} names the module's class, but"),
])
def test_a_bad_argument_is_one_line(extra, expected, capsys):
    assert one_line(["fit", "--config", SINE, *extra], capsys).startswith(expected)


def test_a_class_that_is_not_there_is_named_with_its_option(capsys):
    line = one_line(["fit", "--config", str(REPO / "configs/reptile_sine.yaml"), "--model.class_path", "nope.Module"],
                    capsys)
    assert line == ("metasgd fit: --model.class_path expects MetaLearningModule or null; got 'nope.Module' "
                    "(all options: metasgd fit --help)")


def test_config_file_mistakes_are_one_line(tmp_path, capsys):
    assert one_line(["fit", "--config", str(tmp_path / "nope.yaml")], capsys).startswith(
        "metasgd fit: --config: File does not exist:")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  inner_steps: [1\n")
    assert one_line(["fit", "--config", str(bad)], capsys).startswith("metasgd fit: the config is not valid YAML:")
    assert one_line(["fit"], capsys).startswith("metasgd fit: missing --model.model, --data.")


def test_missing_data_with_download_off_is_one_line(tmp_path, capsys):
    line = one_line(["fit", "--config", OMNIGLOT, "--data.root", str(tmp_path / "none"), "--data.download", "false",
                     "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert line.startswith("metasgd fit: Omniglot data not found") and "download=True" in line


def test_the_traceback_variable_and_our_bugs_keep_tracebacks(monkeypatch):
    monkeypatch.setenv("METASGD_TRACEBACK", "1")
    with pytest.raises(ValueError, match="inner_steps"):
        main(["fit", "--config", SINE, "--model.inner_steps", "-1"])
    monkeypatch.delenv("METASGD_TRACEBACK")

    def bug(*args, **kwargs):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(cli, "resolve_resume_path", bug)
    with pytest.raises(KeyError):
        main(["fit", "--config", SINE, *TINY, "--trainer.max_steps", "1", "--trainer.default_root_dir", "/tmp/x"])


@pytest.mark.cost(6)  # seconds, for the order of the parallel run (conftest.py)
def test_a_real_process_prints_one_line_and_exits_1(tmp_path):
    proc = run_cli("fit", "--config", SINE, "--data.shots", "0", cwd=tmp_path, check=False, fresh=True)
    assert proc.returncode == 1
    assert [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()] == [
        "metasgd fit: SineDataModule `shots` must be an integer >= 1; got 0."]


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory):
    """A 2-step sine run with inner_steps 1, in-process."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["metasgd"])
        main(["fit", "--config", SINE, *TINY, "--trainer.max_steps", "2", "--model.inner_steps", "1",
              "--trainer.default_root_dir", str(root)])
    return root


def test_test_without_weights_says_so_and_with_them_names_their_step(sine_run, capsys):
    main(["test", "--config", SINE, *TINY, "--trainer.default_root_dir", str(sine_run)])
    out = capsys.readouterr()
    assert "metasgd test: no --ckpt_path, so this scores the untrained model" in out.err
    assert "Weights: untrained (no --ckpt_path)" in out.out
    main(["test", "--config", SINE, *TINY, "--trainer.default_root_dir", str(sine_run), "--ckpt_path", "last"])
    assert f"Weights: {sine_run / 'checkpoints' / 'last.ckpt'} (step 2)" in capsys.readouterr().out


def test_best_is_the_run_s_best_checkpoint_and_where_there_is_none_one_line(sine_run, tmp_path, capsys):
    folder = sine_run / "checkpoints"
    states = torch.load(folder / "last.ckpt", weights_only=True)["callbacks"].values()
    recorded = Path(next(state["best_model_path"] for state in states if state.get("best_model_path")))
    assert recorded.parent == folder and recorded.name.startswith("best-step=")
    main(["test", "--config", SINE, *TINY, "--trainer.default_root_dir", str(sine_run), "--ckpt_path", "best"])
    assert f"Weights: {recorded} (step " in capsys.readouterr().out
    shutil.copytree(folder, tmp_path / "moved")  # a run folder moved elsewhere: its best by name
    assert best_checkpoint(tmp_path / "moved") == tmp_path / "moved" / recorded.name
    (tmp_path / "moved" / recorded.name).unlink()  # recorded, but no longer there
    line = one_line(["test", "--config", SINE, *TINY, "--checkpoint.dirpath", str(tmp_path / "moved"),
                     "--ckpt_path", "best"], capsys)
    assert line == (f"metasgd test: --ckpt_path best: {tmp_path / 'moved' / 'last.ckpt'} names no best checkpoint that "
                    f"is in {tmp_path / 'moved'} and intact. Give a .ckpt file, or --ckpt_path last.")
    line = one_line(["validate", "--config", SINE, *TINY, "--trainer.default_root_dir", str(tmp_path / "new"),
                     "--ckpt_path", "best"], capsys)
    assert line == (f"metasgd validate: --ckpt_path best: no checkpoint in {tmp_path / 'new' / 'checkpoints'}. Give the "
                    "run's --trainer.default_root_dir (or --checkpoint.dirpath), or a .ckpt file.")
    line = one_line(["fit", "--config", SINE, *TINY, "--trainer.default_root_dir", str(sine_run), "--ckpt_path", "best"],
                    capsys)
    assert line == ("metasgd fit: --ckpt_path best: fit resumes from `last` (the run's newest state) or from a checkpoint "
                    f"file; to resume from the best, give its file: {recorded}.")


def test_predict_on_several_processes_is_one_line(capsys):
    line = one_line(["predict", "--config", SINE, *TINY, "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
                    capsys)
    assert line == ("metasgd predict: predict runs on one process (given 2), so that its file holds the test tasks in "
                    "order: add --trainer.devices 1 --trainer.num_nodes 1.")


def test_test_with_last_and_no_checkpoint_is_one_line(tmp_path, capsys):
    line = one_line(["test", "--config", SINE, *TINY, "--trainer.default_root_dir", str(tmp_path),
                     "--ckpt_path", "last"], capsys)
    assert line.startswith("metasgd test: --ckpt_path last: no checkpoint in")


def test_resume_says_which_settings_changed(sine_run, capsys):
    # --ckpt_path last keeps the given settings and says what changed from the checkpoint's
    main(["fit", "--config", SINE, *TINY, "--trainer.max_steps", "3", "--model.inner_steps", "2",
          "--trainer.default_root_dir", str(sine_run), "--ckpt_path", "last"])
    assert "Settings changed from the checkpoint's: inner_steps 1 → 2." in capsys.readouterr().err
    # a checkpoint file: LightningCLI takes the checkpoint's settings, and the command says which it overrode
    main(["fit", "--config", SINE, *TINY, "--trainer.max_steps", "4", "--model.inner_steps", "5",
          "--trainer.default_root_dir", str(sine_run), "--ckpt_path", str(sine_run / "checkpoints" / "last.ckpt")])
    assert "--ckpt_path keeps the checkpoint's settings: inner_steps 2 (given 5)" in capsys.readouterr().err


def test_resume_with_another_method_is_one_line(sine_run, capsys):
    line = one_line(["fit", "--config", str(REPO / "configs/reptile_sine.yaml"), *TINY, "--trainer.max_steps", "9",
                     "--trainer.default_root_dir", str(sine_run), "--ckpt_path", "last"], capsys)
    assert line.startswith("metasgd fit: The checkpoint was written by MetaSGDLightningModule, but this run's module "
                           "is ReptileLightningModule.")


def test_a_second_fresh_fit_says_so_and_last_is_its_own(tmp_path, capsys):
    args = ["fit", "--config", SINE, *TINY, "--trainer.default_root_dir", str(tmp_path)]
    main([*args, "--trainer.max_steps", "2"])
    capsys.readouterr()
    main([*args, "--trainer.max_steps", "1"])
    assert "already holds checkpoints of an earlier run; this run starts from scratch" in capsys.readouterr().err
    folder = tmp_path / "checkpoints"
    assert not list(folder.glob("last-v*.ckpt"))
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1


class _ImageTasks(L.LightningDataModule):
    """Two 5-way image tasks per batch, as the image data modules give them."""

    task = "classification"

    def train_dataloader(self):
        batch = (torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1), torch.randn(2, 5, 1, 28, 28),
                 torch.arange(5).repeat(2, 1))
        return torch.utils.data.DataLoader([batch], batch_size=None)

    val_dataloader = train_dataloader


def _fit(module, data):
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, num_sanity_val_steps=1)
    trainer.fit(module, datamodule=data)


def test_images_for_the_sine_network_are_named_before_training():
    module = MetaSGDLightningModule(SineMLP(out_features=5), task="classification")
    with pytest.raises(SetupError, match=r"The examples of _ImageTasks \(inputs of shape \(1, 28, 28\)\) do not fit the "
                                         r"network SineMLP") as error:
        _fit(module, _ImageTasks())
    assert module.global_step == 0 and "configs/omniglot_5way_1shot.yaml" in str(error.value)


def test_regression_data_for_a_classifier_is_named_before_training():
    module = MetaSGDLightningModule(ConvNet4(out_features=5), task="classification")
    with pytest.raises(SetupError, match="SineDataModule gives regression tasks, but the module was built for "
                                         "task='classification' \\(ConvNet4\\)"):
        _fit(module, SineDataModule(meta_batch_size=2, val_tasks=2))
    assert module.global_step == 0


@pytest.mark.parametrize("args, expected", [
    (["plot-lrs"], "metasgd plot-lrs: the following arguments are required: checkpoint"),
    (["plot-lrs", "nope.ckpt"], "metasgd plot-lrs: "),
    (["adapt", "nope.ckpt", "--support", "s", "--queries", "q"], "metasgd adapt: "),
    (["plot-sine", "nope.ckpt", "--bogus"], "metasgd plot-sine: unrecognized arguments: --bogus"),
])
def test_the_checkpoint_commands_answer_in_one_line(args, expected, capsys):
    assert one_line(args, capsys).startswith(expected)
