"""The `metasgd` command end to end: one fit in a real process as a user runs it (shared by the tests of its
logs, checkpoints and output), the other runs by its entry point in this process (``run_in_process``)."""

import logging
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, once_per_session, run_cli, run_in_process
from metasgd_lightning import MetaSGDLightningModule, SineMLP
from metasgd_lightning.commands.cli import main

SMALL = ["--data.meta_batch_size", "4", "--data.train_tasks_per_epoch", "400", "--data.val_tasks", "8",
         "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1", "--trainer.enable_model_summary", "false"]


def _fit(tmp_path, *extra, max_steps=6, run=run_cli):
    return run("fit", "--config", str(REPO / "configs/sine_5shot.yaml"), *SMALL,
               "--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", str(tmp_path / "run"),
               "--checkpoint.dirpath", str(tmp_path / "ckpt"), *extra, cwd=tmp_path)


def _events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})  # 0: keep all
    events.Reload()
    return events


def _scalars(log_dir):
    events = _events(log_dir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return once_per_session(tmp_path_factory, "cli", lambda tmp_path: (tmp_path, _fit(tmp_path, "--lr_monitor.every_n_steps", "3")))


@pytest.mark.cost(3)  # seconds, for the order of the parallel run (conftest.py)
def test_fit_logs_to_tensorboard_and_checkpoints(trained):
    tmp_path, proc = trained
    assert "Final validation mse:" in proc.stdout and "tensorboard --logdir" in proc.stdout
    scalars = _scalars(tmp_path / "run" / "lightning_logs" / "version_0")
    for tag in ("train/mse", "train/meta_lr", "train/support_loss_before", "train/support_loss_after", "val/mse", "val/mse_ci95"):
        assert tag in scalars, f"{tag} not logged; got {sorted(scalars)}"
    assert [step for step, _ in scalars["train/mse"]] == list(range(6))
    assert len(scalars["val/mse"]) == 2  # after steps 3 and 6
    before = dict(scalars["train/support_loss_before"])
    after = dict(scalars["train/support_loss_after"])
    assert sum(after.values()) < sum(before.values())  # the inner step helps on the support set
    checkpoints = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)


def test_learned_rates_are_visible_in_tensorboard(trained):
    tmp_path, _ = trained
    log_dir = tmp_path / "run" / "lightning_logs" / "version_0"
    scalars = _scalars(log_dir)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    for name in ("0.weight", "0.bias", "2.weight", "4.bias"):
        alpha = state[f"meta_learner.lrs.{name.replace('.', '-')}"]
        expected = {"mean": alpha.mean(), "mean_abs": alpha.abs().mean(), "frac_negative": (alpha < 0).float().mean(),
                    "min": alpha.min(), "max": alpha.max()}
        for stat, value in expected.items():
            steps = dict(scalars[f"lr/{name}/{stat}"])
            assert sorted(steps) == [2, 5]  # after the 3rd and 6th update, at the steps of those batches
            assert steps[5] == pytest.approx(float(value), rel=1e-5, abs=1e-7), (name, stat)
    histograms = _events(log_dir).Histograms("lr/2.weight")
    assert [h.step for h in histograms] == [2, 5] and histograms[-1].histogram_value.num == 40 * 40
    assert "train/tasks_per_sec" in scalars and all(v > 0 for _, v in scalars["train/tasks_per_sec"])
    assert "hp_metric" in scalars


@pytest.mark.cost(8)  # seconds, for the order of the parallel run (conftest.py)
def test_third_party_noise_is_silenced(trained):
    _, proc = trained
    for noise in ("Gym has been unmaintained", "litlogger", "LeafSpec"):
        assert noise not in proc.stdout + proc.stderr
    quiet = subprocess.run(
        [sys.executable, "-c", "import metasgd_lightning, datamodules\n"
         "from datamodules.learn2learn_import import import_learn2learn; import_learn2learn()"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    assert quiet.stdout == "" and quiet.stderr == ""


def test_lightning_s_cpu_lines_are_dropped_under_every_package_name_once(caplog):
    """Lightning logs through the rank-zero logger of whichever of its packages was imported last (the standalone
    pytorch_lightning once learn2learn imports it): each name is filtered, and a second call adds no filter."""
    import pytorch_lightning.utilities.rank_zero  # noqa: F401 - as learn2learn imports it
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from metasgd_lightning.commands._quiet import silence_lightning_noise

    silence_lightning_noise()
    silence_lightning_noise()
    names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
    for name in names:
        assert len(logging.getLogger(f"{name}.utilities.rank_zero").filters) == 1, name
    with caplog.at_level(logging.INFO):
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("a line of ours")
        for name in names:
            logging.getLogger(f"{name}.utilities.rank_zero").info("TPU available: False, using: 0 TPU cores")
    assert [record.getMessage() for record in caplog.records] == ["a line of ours"]


def test_resume_continues_global_step_optimizer_and_rates(tmp_path):
    _fit(tmp_path, max_steps=6, run=run_in_process)
    first = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 6
    proc = _fit(tmp_path, "--ckpt_path", "last", max_steps=9, run=run_in_process)
    assert "Restoring states from the checkpoint" in proc.stdout + proc.stderr
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 9
    adam_steps = {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert adam_steps == {9}  # Adam's moments continued from step 6, not restarted
    scalars = _scalars(tmp_path / "run" / "lightning_logs" / "version_1")
    assert [step for step, _ in scalars["train/mse"]] == [6, 7, 8]
    # The learned rates went on from the checkpoint's values: three Adam steps of lr 1e-3 move α by at most ~3e-3.
    key = "meta_learner.lrs.0-weight"
    delta = (resumed["state_dict"][key] - first["state_dict"][key]).abs().max()
    assert 0 < delta <= 3.1e-3


def test_load_from_checkpoint_rebuilds_the_model_from_the_cli_config(trained):
    tmp_path, _ = trained
    # weights_only loading works: the CLI stores the model as its config, not as a pickled object.
    module = MetaSGDLightningModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert isinstance(module.model, SineMLP) and module.task == "regression"
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key
    batch = [torch.randn(2, 5, 1), torch.randn(2, 5, 1), torch.randn(2, 10, 1)]
    again = MetaSGDLightningModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(module.predict_step(batch, 0), again.predict_step(batch, 0))


def test_test_subcommand_prints_mean_and_interval(trained):
    tmp_path, _ = trained
    proc = run_in_process("test", "--config", str(REPO / "configs/sine_5shot.yaml"), "--data.test_tasks", "12",
                          "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
                          "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), cwd=tmp_path)
    assert "Test mse:" in proc.stdout and "95% CI" in proc.stdout
    log_dir = max((tmp_path / "run" / "lightning_logs").iterdir(), key=lambda p: p.stat().st_mtime)
    scalars = _scalars(log_dir)
    assert scalars["hparams/test_mse"][0][1] == pytest.approx(scalars["test/mse"][0][1])  # in the HParams view


def test_checkpoint_of_another_architecture_is_named(trained, tmp_path):
    # The CLI takes the model settings from a checkpoint's hyperparameters, so a mismatch arises with a
    # checkpoint that carries none (e.g. written by another script): strip them.
    checkpoint = torch.load(trained[0] / "ckpt" / "last.ckpt", weights_only=False)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    proc = run_in_process("validate", "--config", str(REPO / "configs/sine_5shot.yaml"), "--model.model.init_args.hidden", "20",
                          "--trainer.default_root_dir", str(tmp_path / "other"), "--checkpoint.dirpath", str(tmp_path / "other"),
                          "--ckpt_path", str(tmp_path / "bare.ckpt"), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "different architecture" in proc.stderr and "(40, 1) in the checkpoint but (20, 1) here" in proc.stderr


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "typo.yaml"
    text = (REPO / "configs/sine_5shot.yaml").read_text()
    assert "\n  inner_steps:" in text  # else the "typo" would be no typo, and this would run the whole demo
    config.write_text(text.replace("\n  inner_steps:", "\n  inner_stepz:"))
    proc = run_in_process("fit", "--config", str(config), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "inner_stepz" in proc.stderr


def _in_process(capsys, monkeypatch, tmp_path, *args: str) -> str:
    """``metasgd ARGS`` by its entry point in this process (no interpreter start-up): what a command that only
    prints and exits writes to standard output. The other tests here run the real command in a subprocess."""
    monkeypatch.setattr("sys.argv", ["metasgd"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("config", ["sine_5shot", "sine_10shot", "sine_20shot"])
def test_configs_parse(config, tmp_path, capsys, monkeypatch):
    out = _in_process(capsys, monkeypatch, tmp_path, "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
                      "--print_config")
    shots = config.removeprefix("sine_").removesuffix("shot")
    assert "class_path: datamodules.SineDataModule" in out and f"shots: {shots}" in out
    assert "inference_mode: false" in out


def test_help_lists_the_meta_sgd_arguments(tmp_path, capsys, monkeypatch):
    out = _in_process(capsys, monkeypatch, tmp_path, "fit", "--help")
    for arg in ("--model.init_lr", "--model.inner_steps", "--model.first_order", "--model.learn_lr", "--checkpoint.monitor"):
        assert arg in out


def test_a_run_stopped_mid_epoch_still_reports_a_final_validation(tmp_path):
    proc = run_in_process("fit", "--config", str(REPO / "configs/sine_5shot.yaml"), "--data.meta_batch_size", "4",
                          "--data.val_tasks", "8", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
                          "--checkpoint.dirpath", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert "Final validation mse:" in proc.stdout


# -- Reptile through the same command ----------------------------------------------------------------


def test_reptile_config_fits_tests_and_loads_through_the_cli(tmp_path):
    from metasgd_lightning import ReptileLightningModule

    proc = run_in_process("fit", "--config", str(REPO / "configs/reptile_sine.yaml"), *SMALL, "--trainer.max_steps", "4",
                          "--model.eval_inner_steps", "4", "--trainer.default_root_dir", str(tmp_path / "run"),
                          "--checkpoint.dirpath", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert "Final validation mse:" in proc.stdout and "95% CI" in proc.stdout
    scalars = _scalars(tmp_path / "run" / "lightning_logs" / "version_0")
    for tag in ("train/support_loss_before", "train/support_loss_after", "train/outer_step_norm", "val/mse",
                "val/mse_ci95", "train/tasks_per_sec"):
        assert tag in scalars, f"{tag} not logged; got {sorted(scalars)}"
    assert [v for _, v in scalars["train/meta_lr"]] == pytest.approx([1.0, 0.75, 0.5, 0.25])  # ε annealed to 0
    assert not any(tag.startswith("lr/") for tag in scalars)  # Reptile learns no rate: the α monitor stays quiet

    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["_class_path"] == "metasgd_lightning.ReptileLightningModule" and hparams["eval_inner_steps"] == 4
    module = ReptileLightningModule.load_from_checkpoint(checkpoint)  # weights_only: configs, no pickles
    assert isinstance(module.model, SineMLP) and module.task == "regression" and module.eval_inner_steps == 4
    batch = [torch.randn(2, 5, 1), torch.randn(2, 5, 1), torch.randn(2, 10, 1)]
    again = ReptileLightningModule.load_from_checkpoint(checkpoint)
    assert torch.equal(module.predict_step(batch, 0), again.predict_step(batch, 0))

    tested = run_in_process("test", "--config", str(REPO / "configs/reptile_sine.yaml"), "--data.test_tasks", "12",
                            "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
                            "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert "Test mse:" in tested.stdout and "95% CI" in tested.stdout

    resumed = run_in_process("fit", "--config", str(REPO / "configs/reptile_sine.yaml"), *SMALL, "--trainer.max_steps", "6",
                             "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
                             "--ckpt_path", "last", cwd=tmp_path)
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6


def test_reptile_omniglot_config_parses_and_fits_a_few_steps(tmp_path):
    import fixtures_episodic as fx

    config = str(REPO / "configs/reptile_omniglot_5way_1shot.yaml")
    printed = run_in_process("fit", "--config", config, "--print_config", cwd=tmp_path).stdout
    for setting in ("class_path: metasgd_lightning.ReptileLightningModule", "inner_optimizer: adam", "inner_lr: 0.001",
                    "inner_steps: 5", "inner_batch_size: 10", "eval_inner_steps: 50", "meta_batch_size: 5",
                    "class_path: datamodules.OmniglotDataModule", "inference_mode: false"):
        assert setting in printed, setting
    assert "inner_betas:\n    - 0.0\n    - 0.999" in printed
    # A small Omniglot-layout folder (16 characters of 4 drawings) and small settings, so that it runs in seconds;
    # 3 ways also checks that the data module's ways still reach the model's outputs.
    root = fx.omniglot_folder(tmp_path / "omni", alphabets=2, characters=8)
    proc = run_in_process("fit", "--config", config, "--data.root", str(root), "--data.layout", "folder",
                          "--data.fractions", "[0.5, 0.25, 0.25]", "--data.ways", "3", "--data.download", "false",
                          "--data.queries", "1", "--data.train_queries", "3", "--data.meta_batch_size", "2",
                          "--data.val_tasks", "4", "--data.num_workers", "0", "--model.model.init_args.hidden_channels", "8",
                          "--model.eval_inner_steps", "3", "--trainer.max_steps", "2",
                          "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
                          cwd=tmp_path)
    assert "Final validation acc:" in proc.stdout, proc.stdout + proc.stderr
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["meta_learner.model.classifier.weight"].shape[0] == 3
