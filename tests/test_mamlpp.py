"""MAML++'s inner-loop options (Antoniou et al. 2019), each off by default."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import SineDataModule
from metasgd_lightning import MetaSGD, MetaSGDLightningModule, SineMLP
from metasgd_lightning.methods.metasgd import multi_step_loss_weights


def _task(tasks=3):
    sx, qx = torch.randn(tasks, 5, 1, dtype=torch.float64), torch.randn(tasks, 7, 1, dtype=torch.float64)
    return sx, torch.sin(sx), qx, torch.sin(qx)


def test_per_step_rates_apply_one_alpha_per_step():
    meta = MetaSGD(SineMLP().double(), init_lr=(0.01, 0.2), inner_steps=2, per_step_lr=True)
    assert meta.lrs["0-weight"].shape == (2, 40, 1)
    sx, sy, qx, qy = (t[0] for t in _task(1))
    fast = meta.adapt(sx, sy, F.mse_loss)
    # By hand: θ1 = θ − α[0] ⊙ ∇L(θ), θ2 = θ1 − α[1] ⊙ ∇L(θ1).
    theta = dict(meta.model.named_parameters())
    g0 = torch.autograd.grad(F.mse_loss(meta(sx, theta), sy), list(theta.values()), create_graph=True)
    theta1 = {n: w - meta.lrs[n.replace(".", "-")][0] * g for (n, w), g in zip(theta.items(), g0)}
    g1 = torch.autograd.grad(F.mse_loss(meta(sx, theta1), sy), list(theta1.values()), create_graph=True)
    theta2 = {n: w - meta.lrs[n.replace(".", "-")][1] * g for (n, w), g in zip(theta1.items(), g1)}
    for name in theta:
        torch.testing.assert_close(fast[name], theta2[name])
    F.mse_loss(meta(qx, fast), qy).backward()
    assert (meta.lrs["2-weight"].grad[0].abs().sum() > 0) and (meta.lrs["2-weight"].grad[1].abs().sum() > 0)
    # More steps at evaluation reuse the last step's rate.
    assert torch.equal(meta.lr("0.weight", 5), meta.lrs["0-weight"][1])


def test_per_step_rates_need_learned_rates():
    with pytest.raises(ValueError, match="needs `learn_lr=True`"):
        MetaSGD(SineMLP(), per_step_lr=True, learn_lr=False)


def test_multi_step_loss_weights_anneal_to_the_last_step():
    w0, w5, w20 = (multi_step_loss_weights(5, epoch, anneal_epochs=10) for epoch in (0, 5, 20))
    torch.testing.assert_close(w0, torch.full((5,), 0.2))
    assert w5[0] == pytest.approx(0.1) and w5[-1] == pytest.approx(0.6)
    torch.testing.assert_close(w20, torch.tensor([0.0, 0, 0, 0, 1]))
    late = multi_step_loss_weights(5, 99, anneal_epochs=100)
    assert late[0] == pytest.approx(0.03 / 5)  # MAML++'s floor for the earlier steps
    for w in (w0, w5, late, w20):
        assert float(w.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_multi_step_loss_is_the_weighted_query_loss_after_every_step(vectorize):
    meta = MetaSGD(SineMLP().double(), init_lr=0.05, inner_steps=3)
    batch = _task()
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    result = meta.adapt_tasks(*batch, F.mse_loss, vectorize=vectorize, step_weights=weights)
    by_hand = sum(
        w * meta.adapt_tasks(*batch, F.mse_loss, steps=k, vectorize="loop").query_loss for k, w in zip((1, 2, 3), weights)
    )
    torch.testing.assert_close(result.query_loss, by_hand)
    with pytest.raises(ValueError, match=r"`step_weights` must have shape \(3,\)"):
        meta.adapt_tasks(*batch, F.mse_loss, step_weights=weights[:2])


def test_training_uses_first_order_then_second_order_and_annealed_weights(tmp_path, monkeypatch):
    module = MetaSGDLightningModule(SineMLP(), task="regression", inner_steps=2, first_order_epochs=1,
                                    multi_step_loss=True, multi_step_loss_epochs=2)
    calls = []
    adapt_tasks = module.meta_learner.adapt_tasks

    def spy(*args, **kwargs):
        calls.append((module.current_epoch, kwargs["first_order"], kwargs["step_weights"]))
        return adapt_tasks(*args, **kwargs)

    monkeypatch.setattr(module.meta_learner, "adapt_tasks", spy)
    trainer = L.Trainer(max_epochs=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
    trainer.fit(module, SineDataModule(meta_batch_size=2, train_tasks_per_epoch=4))
    by_epoch = {epoch: (first_order, weights) for epoch, first_order, weights in calls}
    assert by_epoch[0][0] is True and by_epoch[1][0] is None and by_epoch[2][0] is None
    torch.testing.assert_close(by_epoch[0][1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(by_epoch[1][1], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(by_epoch[2][1], torch.tensor([0.0, 1.0]))


def test_options_are_off_by_default():
    module = MetaSGDLightningModule(SineMLP(), task="regression")
    assert not module.meta_learner.per_step_lr and not module.multi_step_loss and module.first_order_epochs == 0
