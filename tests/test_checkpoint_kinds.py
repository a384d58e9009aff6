"""The wrong kind of file given as a checkpoint is named as such: a regression checkpoint to the image path,
an image (or other non-checkpoint) where a checkpoint belongs."""

import os

import pytest
from PIL import Image

from conftest import REPO, run_in_process
from forked_python import run_python
from metasgd_lightning.commands.inference import adapt_to_folder, checkpoint_transform, load_meta_learner
from metasgd_lightning.commands.plotting import plot_learned_rates
from metasgd_lightning.training.checkpointing import CheckpointCorruptError, foreign_format


@pytest.fixture(scope="module")
def sine_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sine")
    run_in_process("fit", "--config", str(REPO / "configs/sine_5shot.yaml"), "--data.meta_batch_size", "2",
                   "--data.val_tasks", "4", "--trainer.max_steps", "1", "--trainer.enable_model_summary", "false",
                   "--trainer.default_root_dir", str(tmp_path / "run"), cwd=tmp_path)
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("L", (8, 8)).save(path)
    return path


@pytest.fixture
def support(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "support" / name).mkdir(parents=True)
        Image.new("L", (28, 28)).save(tmp_path / "support" / name / "1.png")
    return tmp_path / "support"


@pytest.mark.cost(4)  # seconds, for the order of the parallel run (conftest.py)
def test_a_regression_checkpoint_given_for_images_is_named(sine_checkpoint, support):
    with pytest.raises(ValueError, match=r"is a regression checkpoint \(meta-trained on datamodules.SineDataModule"):
        checkpoint_transform(sine_checkpoint)
    with pytest.raises(ValueError, match="is a regression checkpoint"):
        checkpoint_transform(load_meta_learner(sine_checkpoint))
    with pytest.raises(ValueError, match="is a regression checkpoint"):
        adapt_to_folder(sine_checkpoint, support)
    example = run_python([REPO / "examples/adapt_to_your_images.py", sine_checkpoint, support, support], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert example.returncode == 1 and "is a regression checkpoint" in example.stderr
    assert "not an imported image data module" not in example.stderr


def test_an_image_given_as_a_checkpoint_is_called_not_a_checkpoint(png, tmp_path):
    assert foreign_format(png) == "a PNG image"
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint: it is a PNG image") as error:
        load_meta_learner(png)
    assert "weights_only" not in str(error.value) and "trusted" not in str(error.value)
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint: it is a PNG image"):
        plot_learned_rates(png, tmp_path / "lrs.png")
    assert "is not a PyTorch checkpoint: it is a PNG image" in str(CheckpointCorruptError(png))
    proc = run_in_process("test", "--config", str(REPO / "configs/sine_5shot.yaml"), "--ckpt_path", str(png),
                          cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "is not a PyTorch checkpoint: it is a PNG image" in proc.stderr


def test_a_truncated_checkpoint_is_still_called_truncated(sine_checkpoint, tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(sine_checkpoint.read_bytes()[:2000])
    assert foreign_format(broken) is None and foreign_format(sine_checkpoint) is None
    assert "truncated or corrupt" in str(CheckpointCorruptError(broken))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_meta_learner(broken)
