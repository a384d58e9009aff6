"""Checkpoints and configs saved by an earlier version still load (tests/fixtures/before_split/README.md).

They were written by ``metasgd fit`` before the data package was split by job: the ``class_path`` of
their data module (``datamodules.OmniglotDataModule``), their model and callback states must still be
found by today's code.
"""

import lightning as L
import pytest
import torch

import fixtures_episodic as fx
from conftest import REPO, run_in_process
from datamodules import OmniglotDataModule
from metasgd_lightning import ConvNet4, MetaSGDLightningModule, SineMLP
from metasgd_lightning.training.callbacks import MetaSGDCheckpoint

FIXTURES = REPO / "tests" / "fixtures" / "before_split"


def test_old_checkpoints_load_with_safe_weights_only_loading():
    sine = MetaSGDLightningModule.load_from_checkpoint(FIXTURES / "sine.ckpt")
    assert isinstance(sine.model, SineMLP) and sine.task == "regression"
    omniglot = MetaSGDLightningModule.load_from_checkpoint(FIXTURES / "omniglot.ckpt")
    assert isinstance(omniglot.model, ConvNet4) and omniglot.task == "classification"
    state = torch.load(FIXTURES / "omniglot.ckpt", weights_only=True)["state_dict"]
    for key, value in omniglot.state_dict().items():
        assert torch.equal(value, state[key]), key
    support = torch.rand(1, 3, 1, 28, 28), torch.arange(3)[None], torch.rand(1, 6, 1, 28, 28)
    assert omniglot.predict_step(support, 0).shape[:2] == (1, 6)  # a prediction per query image


def test_old_omniglot_checkpoint_rebuilds_its_preprocessing():
    from metasgd_lightning.commands.inference import checkpoint_transform, load_meta_learner

    module = load_meta_learner(FIXTURES / "omniglot.ckpt")
    assert module.datamodule_hparams["_class_path"] == "datamodules.OmniglotDataModule"
    assert repr(checkpoint_transform(module)) == repr(OmniglotDataModule(image_size=28).transform("test"))


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the fixture's run folder is not this one
@pytest.mark.parametrize("name, metric", [("sine", ("val/mse", "min")), ("omniglot", ("val/acc", "max"))])
def test_old_checkpoint_callback_state_is_found(tmp_path, name, metric):
    # Lightning restores a callback's state by its state key, which holds the monitored metric and mode.
    module = MetaSGDLightningModule.load_from_checkpoint(FIXTURES / f"{name}.ckpt")
    callback = MetaSGDCheckpoint(dirpath=tmp_path)
    trainer = L.Trainer(callbacks=[callback], logger=False, accelerator="cpu", inference_mode=False)
    callback.setup(trainer, module, "fit")
    assert (callback.monitor, callback.mode) == metric
    saved = torch.load(FIXTURES / f"{name}.ckpt", weights_only=True)["callbacks"]
    assert callback.state_key in saved, (callback.state_key, list(saved))
    callback.load_state_dict(saved[callback.state_key])
    assert callback.best_model_path.endswith("best-step=2.ckpt")


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # as in the test above
def test_old_config_and_checkpoint_run_metasgd_test(tmp_path):
    proc = run_in_process("test", "--config", str(FIXTURES / "sine_config.yaml"), "--ckpt_path",
                          str(FIXTURES / "sine.ckpt"), "--trainer.default_root_dir", str(tmp_path / "run"),
                          "--checkpoint.dirpath", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert "Test mse:" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # as in the test above
def test_old_image_config_and_checkpoint_run_metasgd_test(tmp_path):
    # The Omniglot folder they were trained on, generated again (the same seeds give the same drawings).
    root = fx.omniglot_folder(tmp_path / "omni", alphabets=2, characters=8)
    proc = run_in_process("test", "--config", str(FIXTURES / "omniglot_config.yaml"), "--ckpt_path",
                          str(FIXTURES / "omniglot.ckpt"), "--data.root", str(root), "--trainer.default_root_dir",
                          str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert "Test acc:" in proc.stdout, proc.stdout + proc.stderr
