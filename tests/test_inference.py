"""Using a trained meta-learner: loading, adapting to a new task as a plain nn.Module, plotting its rates."""

import lightning as L
import pytest
import torch

from conftest import REPO, run_cli
from metasgd_lightning import ConvNet4, MetaSGDLightningModule, SineMLP
from metasgd_lightning.inference import adapt, load_meta_learner


@pytest.fixture(scope="module")
def python_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("inference") / "conv.ckpt"
    module = MetaSGDLightningModule(ConvNet4(out_features=3, hidden_channels=8), task="classification", init_lr=0.1)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def _support(ways=3, shots=2):
    return torch.randn(ways * shots, 1, 28, 28), torch.arange(ways).repeat_interleave(shots)


def test_adapt_returns_a_plain_module_with_the_adapted_weights(python_checkpoint):
    module = load_meta_learner(python_checkpoint)
    support_x, support_y = _support()
    model = adapt(module, support_x, support_y)
    assert type(model) is ConvNet4 and not isinstance(model, L.LightningModule)
    assert not any(p.requires_grad for p in model.parameters())
    query = torch.randn(9, 1, 28, 28)
    fast = module.meta_learner.adapt(support_x, support_y, module.loss_fn, first_order=True)
    torch.testing.assert_close(model(query), module(query, fast).detach())
    assert not torch.allclose(model(query), module(query))  # adaptation changed the predictions


def test_support_sets_that_do_not_fit_are_named(python_checkpoint):
    module = load_meta_learner(python_checkpoint)
    x, y = _support()
    with pytest.raises(ValueError, match=r"3-way tasks.*Missing classes: \[2\]"):
        adapt(module, x[:4], y[:4])
    with pytest.raises(ValueError, match=r"labels out of range: \[3\]"):
        adapt(module, torch.randn(8, 1, 28, 28), torch.arange(4).repeat_interleave(2))
    with pytest.raises(ValueError, match=r"images of shape \[batch, 1, 28, 28\]; got \(6, 1, 32, 32\)"):
        adapt(module, torch.randn(6, 1, 32, 32), y)
    with pytest.raises(ValueError, match="same number of examples"):
        adapt(module, x, y[:5])


def test_bad_checkpoints_are_named(python_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_meta_learner(tmp_path / "missing.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a PyTorch checkpoint"):
        load_meta_learner(tmp_path / "notes.txt")
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint of MetaSGDLightningModule"):
        load_meta_learner(tmp_path / "other.ckpt")
    # A model the module cannot describe as a config (no recorded init_args) is stored pickled:
    # refused unless trusted.
    module = MetaSGDLightningModule(torch.nn.Sequential(torch.nn.Linear(1, 1)), task="regression")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="trusted=True"):
        load_meta_learner(tmp_path / "pickled.ckpt")
    assert isinstance(load_meta_learner(tmp_path / "pickled.ckpt", trusted=True).model, torch.nn.Sequential)


def test_regression_adaptation_fits_the_new_task():
    module = MetaSGDLightningModule(SineMLP(), task="regression", init_lr=0.05, eval_inner_steps=200)
    x = torch.linspace(-5, 5, 20)[:, None]
    y = 2.0 * torch.sin(x - 1.0)
    before = torch.nn.functional.mse_loss(module(x).detach(), y)
    after = torch.nn.functional.mse_loss(adapt(module, x, y)(x), y)
    assert after < 0.5 * before


def test_plot_lrs_draws_a_png(python_checkpoint, tmp_path):
    proc = run_cli("plot-lrs", str(python_checkpoint), "--out", str(tmp_path / "lrs.png"), cwd=tmp_path)
    assert "Wrote" in proc.stdout
    data = (tmp_path / "lrs.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    bad = run_cli("plot-lrs", str(tmp_path / "missing.ckpt"), cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "No checkpoint at" in bad.stderr
