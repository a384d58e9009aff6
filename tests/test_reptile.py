"""Reptile: the update against hand-written references, the k = 1 identity, evaluation, checkpoints, bad input."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from datamodules import SineDataModule
from metasgd_lightning import ConvNet4, InnerLoopDivergedError, Reptile, ReptileLightningModule, SineMLP
from metasgd_lightning.methods.reptile import adam_step, minibatch_indices

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def _trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**defaults, **kwargs})


def _sine_data(**kwargs):
    return SineDataModule(**{**dict(meta_batch_size=8, train_tasks_per_epoch=400, val_tasks=64, test_tasks=64), **kwargs})


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


def _regression_batch(tasks=3, shots=4, queries=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(tasks, n, 1, generator=g, dtype=dtype) for n in (shots, shots, queries, queries)]


def _loader(batch) -> DataLoader:
    """A DataLoader whose one batch is ``batch`` (a meta-batch of tasks)."""
    return DataLoader(list(zip(*batch)), batch_size=len(batch[0]))


def _one_step(tmp_path, module, batch, **trainer_args):
    """One Lightning training step of ``module`` on ``batch``; the weights before it."""
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    _trainer(tmp_path, max_steps=1, **trainer_args).fit(module, train_dataloaders=_loader(batch))
    return before


def _reference_update(model: nn.Module, batch, steps: int, optimizer: str, lr: float, epsilon: float,
                      batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """The paper's update written out: per task a cloned model, k steps of torch.optim, θ + ε · mean(θ̃ − θ)."""
    support_x, support_y, query_x, query_y = batch
    x, y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
    adapted = []
    for task, (tx, ty) in enumerate(zip(x, y)):
        clone = copy.deepcopy(model)
        if optimizer == "adam":
            inner = torch.optim.Adam(clone.parameters(), lr=lr, betas=(0.0, 0.999))
        else:
            inner = torch.optim.SGD(clone.parameters(), lr=lr)
        order = None if batch_size is None else minibatch_indices(len(tx), batch_size, steps, seed=task)
        for step in range(steps):
            bx, by = (tx, ty) if order is None else (tx[order[step]], ty[order[step]])
            inner.zero_grad()
            F.mse_loss(clone(bx), by).backward()
            inner.step()
        adapted.append(dict(clone.named_parameters()))
    theta = dict(model.named_parameters())
    return {n: (w + epsilon * torch.stack([a[n] - w for a in adapted]).mean(0)).detach() for n, w in theta.items()}


# -- the maths ---------------------------------------------------------------------------------------


def test_adam_step_is_torch_adam():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(4)]
    reference = nn.Parameter(weight.clone())
    adam = torch.optim.Adam([reference], lr=0.01, betas=(0.0, 0.999))
    params, moments = {"w": weight}, ({"w": torch.zeros_like(weight)}, {"w": torch.zeros_like(weight)})
    for step, grad in enumerate(grads, start=1):
        reference.grad = grad
        adam.step()
        params, moments = adam_step(params, {"w": grad}, moments, step, lr=0.01, betas=(0.0, 0.999), eps=1e-8)
        torch.testing.assert_close(params["w"], reference.detach(), rtol=0, atol=1e-15)


def test_minibatches_go_through_the_examples_before_reshuffling():
    order = minibatch_indices(examples=10, batch_size=4, steps=5, seed=3)  # 20 draws: two passes of 10
    assert order.shape == (5, 4)
    first, second = order.flatten()[:10], order.flatten()[10:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert torch.equal(order, minibatch_indices(10, 4, 5, seed=3))
    assert not torch.equal(order, minibatch_indices(10, 4, 5, seed=4))


@pytest.mark.parametrize("optimizer, batch_size", [("sgd", None), ("adam", None), ("adam", 3), ("sgd", 4)])
def test_one_meta_step_equals_the_hand_written_update(tmp_path, optimizer, batch_size):
    torch.manual_seed(0)
    batch = _regression_batch()
    module = ReptileLightningModule(_tiny_net(), task="regression", inner_steps=3, inner_lr=0.05,
                                    inner_optimizer=optimizer, inner_batch_size=batch_size,
                                    optimizer=partial(torch.optim.SGD, lr=0.7))
    before = _one_step(tmp_path, module, batch, precision="64-true")
    model = _tiny_net().double()
    model.load_state_dict(before)
    expected = _reference_update(model, batch, steps=3, optimizer=optimizer, lr=0.05, epsilon=0.7,
                                 batch_size=batch_size)
    for name, p in module.model.named_parameters():
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-12, atol=1e-13, msg=name)
    assert max((expected[n] - before[n]).abs().max() for n in before) > 1e-3  # the step moved θ


def test_one_sgd_inner_step_is_a_gradient_step_on_the_tasks_mean_loss(tmp_path):
    # k = 1: θ̃ᵢ = θ − α∇Lᵢ(θ), so θ + ε · mean(θ̃ᵢ − θ) = θ − εα ∇ meanᵢ Lᵢ(θ) (joint training).
    batch = _regression_batch(tasks=4)
    module = ReptileLightningModule(_tiny_net(), task="regression", inner_steps=1, inner_lr=0.1, inner_optimizer="sgd",
                                    optimizer=partial(torch.optim.SGD, lr=0.5))
    before = _one_step(tmp_path, module, batch, precision="64-true")
    model = _tiny_net().double()
    model.load_state_dict(before)
    x, y = torch.cat([batch[0], batch[2]], 1), torch.cat([batch[1], batch[3]], 1)
    mean_loss = torch.stack([F.mse_loss(model(tx), ty) for tx, ty in zip(x, y)]).mean()
    grads = dict(zip(before, torch.autograd.grad(mean_loss, list(model.parameters()))))
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - 0.5 * 0.1 * grads[name], rtol=1e-12, atol=1e-14)


def test_several_inner_steps_are_not_joint_training():
    # With k = 2 the direction has the terms that make Reptile a meta-learner: it differs from two
    # gradient steps on the mean loss.
    torch.manual_seed(0)
    reptile = Reptile(_tiny_net().double(), inner_lr=0.3, inner_steps=2, inner_optimizer="sgd")
    sx, sy, _, _ = _regression_batch(tasks=4)
    direction = reptile.meta_step(sx, sy, F.mse_loss).direction
    joint = copy.deepcopy(reptile.model)
    sgd = torch.optim.SGD(joint.parameters(), lr=0.3)
    for _ in range(2):
        sgd.zero_grad()
        torch.stack([F.mse_loss(joint(x), y) for x, y in zip(sx, sy)]).mean().backward()
        sgd.step()
    joint_direction = {n: p.detach() - q.detach() for (n, p), q in zip(reptile.model.named_parameters(), joint.parameters())}
    assert max((direction[n] - joint_direction[n]).abs().max() for n in direction) > 1e-4


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_vmap_and_loop_agree(optimizer):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if optimizer == "sgd":
        model, loss_fn = ConvNet4(out_features=3, in_channels=1, hidden_channels=8, image_size=28), F.cross_entropy
        x, y = torch.randn(2, 6, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 2)
    else:
        # Not ConvNet4 with Adam: a conv bias before batch norm has a gradient of rounding noise only, which
        # Adam's normalisation turns into a step of ±lr whose sign differs between two exact computations.
        model, loss_fn = SineMLP(), F.mse_loss
        x, y = torch.randn(2, 6, 1, generator=g), torch.randn(2, 6, 1, generator=g)
    reptile = Reptile(model, inner_lr=0.01, inner_steps=3, inner_optimizer=optimizer, batch_size=4)
    loop = reptile.meta_step(x, y, loss_fn, vectorize="loop", seeds=[5, 6])
    loop_state = reptile.inner_state
    reptile.reset_inner_state()  # both from the same (fresh) state
    vmapped = reptile.meta_step(x, y, loss_fn, vectorize="vmap", seeds=[5, 6])
    torch.testing.assert_close(vmapped.support_loss, loop.support_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vmapped.loss_after, loop.loss_after, rtol=1e-5, atol=1e-5)
    for name in loop.direction:
        torch.testing.assert_close(vmapped.direction[name], loop.direction[name], rtol=1e-4, atol=1e-6, msg=name)
    if optimizer == "adam":  # the kept state: the tasks' mean final moments, 3 steps on
        assert loop_state.step == reptile.inner_state.step == 3
        for name in loop.direction:
            torch.testing.assert_close(reptile.inner_state.exp_avg_sq[name], loop_state.exp_avg_sq[name],
                                       rtol=1e-4, atol=1e-10, msg=name)
    else:
        assert loop_state is None and reptile.inner_state is None
    evaluation = [reptile.adapt_tasks(x, y, x, y, loss_fn, vectorize=v) for v in ("loop", "vmap")]
    torch.testing.assert_close(evaluation[1].query_loss, evaluation[0].query_loss, rtol=1e-5, atol=1e-5)


def test_theta_is_not_modified_by_adaptation_and_frozen_parameters_stay():
    model = _tiny_net()
    model[0].bias.requires_grad_(False)
    reptile = Reptile(model, inner_lr=0.1, inner_steps=3, inner_optimizer="adam")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sx, sy, _, _ = _regression_batch(dtype=torch.float32)
    fast = reptile.adapt(sx[0], sy[0], F.mse_loss)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert fast["0.bias"] is model[0].bias and not torch.equal(fast["0.weight"], before["0.weight"])
    assert "0.bias" not in reptile.meta_step(sx, sy, F.mse_loss).direction


# -- the Lightning recipe ----------------------------------------------------------------------------


def test_meta_training_lowers_validation_mse(tmp_path):
    torch.manual_seed(0)
    module = ReptileLightningModule(SineMLP(), task="regression", inner_steps=5, inner_lr=0.02, inner_optimizer="sgd",
                                    eval_inner_steps=10, optimizer=partial(torch.optim.SGD, lr=1.0))
    data = _sine_data()
    before = _trainer(tmp_path, limit_val_batches=None).validate(module, data, verbose=False)[0]["val/mse"]
    trainer = _trainer(tmp_path, max_steps=150)
    trainer.fit(module, data)
    after = _trainer(tmp_path, limit_val_batches=None).validate(module, data, verbose=False)[0]["val/mse"]
    assert trainer.global_step == 150
    assert after < 0.7 * before, (before, after)


def test_outer_step_size_anneals_linearly_to_zero(tmp_path):
    rates = []

    class Rates(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = ReptileLightningModule(SineMLP(), task="regression", inner_optimizer="sgd", inner_lr=0.01)
    _trainer(tmp_path, max_steps=4, callbacks=[Rates()]).fit(module, _sine_data())
    assert rates == pytest.approx([1.0, 0.75, 0.5, 0.25])  # ε (1 − t/T), the default ε = 1
    fixed = ReptileLightningModule(SineMLP(), task="regression", anneal=False)
    assert fixed.configure_optimizers().param_groups[0]["lr"] == 1.0  # plain SGD, ε = 1, no scheduler


def test_evaluation_adapts_the_support_set_with_eval_steps_and_scores_the_query_set(tmp_path):
    torch.manual_seed(0)
    module = ReptileLightningModule(SineMLP(), task="regression", inner_steps=2, inner_lr=0.02, inner_optimizer="sgd",
                                    eval_inner_steps=7, eval_inner_batch_size=3)
    data = _sine_data(test_tasks=6)
    _trainer(tmp_path).test(module, data, verbose=False)
    values = module.test_results["mse"]["values"]
    assert module.metric_names == ("mse",) and len(values) == 6
    data.setup("test")
    support_x, support_y, query_x, query_y = next(iter(data.test_dataloader()))
    for task in range(6):
        # Every task's mini-batch order starts from seed 0 at evaluation.
        fast = module.meta_learner.adapt(support_x[task], support_y[task], F.mse_loss, steps=7, batch_size=3, seed=0)
        expected = F.mse_loss(module.meta_learner(query_x[task], fast), query_y[task])
        assert float(values[task]) == pytest.approx(float(expected), rel=1e-5)
    module.eval_inner_steps = 1  # as the benchmarks set it: fewer steps, another score
    _trainer(tmp_path).test(module, data, verbose=False)
    assert not torch.allclose(module.test_results["mse"]["values"], values)


# A step's checkpoint holds the weights after the step (manual optimisation), which is what resuming needs; the
# resumed run writes no checkpoints, so it needs no ModelCheckpoint like the one that wrote step=2.ckpt.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization:UserWarning")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_checkpoint_round_trip_and_resume(tmp_path):
    torch.manual_seed(0)
    make = lambda: ReptileLightningModule(  # noqa: E731
        SineMLP(), task="regression", inner_steps=3, inner_lr=0.02, inner_optimizer="adam", inner_batch_size=6,
        optimizer=torch.optim.Adam)
    straight = make()
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = _trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[every_2])
    trainer.fit(straight, _sine_data())
    trainer.save_checkpoint(tmp_path / "reptile.ckpt")
    assert straight.hparams["model"] == {"class_path": "metasgd_lightning.methods.models.SineMLP",
                                         "init_args": {"hidden": 40, "in_features": 1, "out_features": 1}}
    assert straight.hparams["optimizer"] == {"class_path": "torch.optim.adam.Adam"}
    restored = ReptileLightningModule.load_from_checkpoint(tmp_path / "reptile.ckpt", weights_only=True)
    assert restored.meta_learner.inner_optimizer == "adam" and restored.meta_learner.batch_size == 6
    batch = next(iter(_sine_data().test_dataloader()))
    torch.testing.assert_close(restored.predict_step(batch, 0), straight.predict_step(batch, 0), rtol=0, atol=0)

    # Resuming at step 2 takes the steps of the run that never stopped: θ, the outer Adam, the annealing of ε
    # and the mini-batch orders.
    resumed = make()
    _trainer(tmp_path, max_steps=4).fit(resumed, _sine_data(), ckpt_path=tmp_path / "ckpt" / "step=2.ckpt",
                                        weights_only=True)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_inference_adapt_gives_a_plain_module_with_the_adapted_weights():
    from metasgd_lightning.commands.inference import adapt

    module = ReptileLightningModule(SineMLP(), task="regression", inner_optimizer="sgd", inner_lr=0.02, eval_inner_steps=6)
    sx, sy, qx, _ = _regression_batch(dtype=torch.float32)
    model = adapt(module, sx[0], sy[0])
    assert type(model) is SineMLP
    torch.testing.assert_close(model(qx[0]), module.predict_task(sx[0], sy[0], qx[0]), rtol=0, atol=0)


def test_16_mixed_with_a_loss_scaler_takes_the_float32_step(tmp_path):
    # The outer gradient goes through Lightning's loss scaler (scaled, then unscaled) and the inner loop
    # runs in float32 under float16 autocast: the step is float32's.
    from lightning.pytorch.plugins.precision import MixedPrecision

    batch = _regression_batch(dtype=torch.float32)
    steps = []
    for plugins in ([], [MixedPrecision("16-mixed", "cpu")]):
        torch.manual_seed(0)
        module = ReptileLightningModule(SineMLP(), task="regression", inner_steps=3, inner_lr=0.02,
                                        inner_optimizer="sgd")
        trainer = _trainer(tmp_path, max_steps=1, plugins=plugins)
        trainer.fit(module, train_dataloaders=_loader(batch))
        steps.append(dict(module.model.named_parameters()))
    assert trainer.precision_plugin.scaler is not None
    for name in steps[0]:
        torch.testing.assert_close(steps[1][name], steps[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_classification_trains_and_reports_accuracy(tmp_path):
    torch.manual_seed(0)
    ways, shots, queries = 3, 1, 2
    g = torch.Generator().manual_seed(0)
    batch = [torch.randn(2, ways * shots, 1, 28, 28, generator=g), torch.arange(ways).repeat(2, shots),
             torch.randn(2, ways * queries, 1, 28, 28, generator=g), torch.arange(ways).repeat_interleave(queries).repeat(2, 1)]
    module = ReptileLightningModule(ConvNet4(out_features=ways, in_channels=1, hidden_channels=8, image_size=28),
                                    inner_steps=2, eval_inner_steps=3)
    _one_step(tmp_path, module, batch)
    _trainer(tmp_path).test(module, _loader(batch), verbose=False)
    assert set(module.test_results) == {"loss", "acc"} and module.monitor == ("val/acc", "max")
    assert module.predict_step(batch[:3], 0).shape == (2, ways * queries)


def test_evaluation_in_inference_mode_fails_at_once_with_the_fix(tmp_path):
    module = ReptileLightningModule(SineMLP(), task="regression")
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        _trainer(tmp_path, inference_mode=True, limit_val_batches=None).validate(module, _sine_data(), verbose=False)


def test_a_diverging_inner_loop_is_named(tmp_path):
    batch = _regression_batch(dtype=torch.float32)
    batch[1][1, 0, 0] = float("nan")
    module = ReptileLightningModule(SineMLP(), task="regression", inner_optimizer="sgd")
    with pytest.raises(InnerLoopDivergedError, match=r"training \(global step 0\).*task 1"):
        _one_step(tmp_path, module, batch)


@pytest.mark.parametrize("kwargs, message", [
    (dict(inner_optimizer="rmsprop"), "inner_optimizer"),
    (dict(inner_lr=0.0), "inner_lr"),
    (dict(inner_steps=0), "inner_steps"),
    (dict(inner_betas=(0.9, 1.0)), "betas"),
    (dict(inner_batch_size=0), "batch_size"),
    (dict(eval_inner_batch_size=-1), "eval_inner_batch_size"),
    (dict(task="ranking"), "task"),
    (dict(gradient_clip_val=0), "gradient_clip_val"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReptileLightningModule(SineMLP(), **{"task": "regression", **kwargs})


def test_annealing_needs_a_finite_run(tmp_path):
    module = ReptileLightningModule(SineMLP(), task="regression")
    with pytest.raises(ValueError, match="finite run"):
        _trainer(tmp_path, max_steps=-1, max_epochs=-1).fit(module, _sine_data())


# -- the kept inner Adam state ----------------------------------------------------------------------


def _adam_from(model: nn.Module, state, lr: float) -> torch.optim.Adam:
    """torch.optim.Adam over ``model`` started from a Reptile ``AdamState`` (None: fresh)."""
    adam = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999), foreach=True)
    if state is not None:
        for name, p in model.named_parameters():
            adam.state[p] = {"step": torch.tensor(float(state.step)), "exp_avg": state.exp_avg[name].clone(),
                             "exp_avg_sq": state.exp_avg_sq[name].clone()}
    return adam


def test_the_kept_adam_state_is_the_tasks_mean_final_state_and_the_next_tasks_start_from_it():
    torch.manual_seed(0)
    x, y = torch.randn(3, 6, 1, dtype=torch.float64), torch.randn(3, 6, 1, dtype=torch.float64)
    reptile = Reptile(_tiny_net().double(), inner_lr=0.05, inner_steps=2, inner_optimizer="adam")
    for meta_step in range(2):
        before, theta = reptile.inner_state, copy.deepcopy(reptile.model)
        step = reptile.meta_step(x, y, F.mse_loss, vectorize="loop")
        # Reference: each task a torch.optim.Adam (foreach, as the loop path) started from the kept state.
        finals, adapted = [], []
        for tx, ty in zip(x, y):
            clone = copy.deepcopy(theta)
            adam = _adam_from(clone, before, lr=0.05)
            for _ in range(2):
                adam.zero_grad()
                F.mse_loss(clone(tx), ty).backward()
                adam.step()
            finals.append({n: adam.state[p] for n, p in clone.named_parameters()})
            adapted.append(dict(clone.named_parameters()))
        state = reptile.inner_state
        assert state.step == 2 * (meta_step + 1)  # the step count continues
        for name, w in theta.named_parameters():
            mean_adapted = torch.stack([a[name].detach() for a in adapted]).mean(0)
            torch.testing.assert_close(step.direction[name], w.detach() - mean_adapted, rtol=0, atol=1e-15)
            for key in ("exp_avg", "exp_avg_sq"):
                expected = torch.stack([f[name][key] for f in finals]).mean(0)
                torch.testing.assert_close(getattr(state, key)[name], expected, rtol=1e-14, atol=0)
        with torch.no_grad():  # the outer step, ε = 1
            for name, p in reptile.model.named_parameters():
                p -= step.direction[name]


def test_the_loop_paths_in_place_adam_is_torch_adam_exactly():
    torch.manual_seed(0)
    x, y = torch.randn(1, 6, 1, dtype=torch.float64), torch.randn(1, 6, 1, dtype=torch.float64)
    reptile = Reptile(_tiny_net().double(), inner_lr=0.05, inner_steps=4, inner_optimizer="adam")
    reptile.meta_step(x, y, F.mse_loss, vectorize="loop")  # a kept state to start from
    clone = copy.deepcopy(reptile.model)
    adam = _adam_from(clone, reptile.inner_state, lr=0.05)
    fast = reptile.adapt(x[0], y[0], F.mse_loss)
    for _ in range(4):
        adam.zero_grad()
        F.mse_loss(clone(x[0]), y[0]).backward()
        adam.step()
    for name, p in clone.named_parameters():
        torch.testing.assert_close(fast[name], p.detach(), rtol=0, atol=0, msg=name)


def test_evaluation_starts_from_a_copy_of_the_kept_state_and_leaves_it():
    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 1), torch.randn(2, 6, 1)
    reptile = Reptile(_tiny_net(), inner_lr=0.05, inner_steps=3, inner_optimizer="adam")
    reptile.meta_step(x, y, F.mse_loss)
    kept = copy.deepcopy(reptile.inner_state)
    with_state = reptile.adapt_tasks(x, y, x, y, F.mse_loss, steps=5)
    reptile.adapt(x[0], y[0], F.mse_loss, steps=5)
    assert reptile.inner_state.step == kept.step == 3
    for name in kept.exp_avg_sq:
        assert torch.equal(reptile.inner_state.exp_avg_sq[name], kept.exp_avg_sq[name])
    fresh = Reptile(reptile.model, inner_lr=0.05, inner_steps=3, inner_optimizer="adam", persistent_state=False)
    assert fresh.inner_state is None
    assert not torch.allclose(fresh.adapt_tasks(x, y, x, y, F.mse_loss, steps=5).query_loss, with_state.query_loss)
    fresh.meta_step(x, y, F.mse_loss)
    assert fresh.inner_state is None  # persistent_state=False keeps nothing
    assert Reptile(_tiny_net(), inner_optimizer="sgd").persistent_state is False  # SGD has no state


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization:UserWarning")
def test_checkpoints_carry_the_kept_state_and_old_checkpoints_start_fresh(tmp_path):
    torch.manual_seed(0)
    module = ReptileLightningModule(SineMLP(), task="regression", inner_steps=3, inner_lr=0.02, inner_optimizer="adam")
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, _sine_data())
    trainer.save_checkpoint(tmp_path / "reptile.ckpt")
    saved = torch.load(tmp_path / "reptile.ckpt", weights_only=True)
    assert saved["reptile_inner_state"]["step"] == 6
    restored = ReptileLightningModule.load_from_checkpoint(tmp_path / "reptile.ckpt", weights_only=True)
    assert restored.meta_learner.inner_state.step == 6
    for name, v in module.meta_learner.inner_state.exp_avg_sq.items():
        assert torch.equal(restored.meta_learner.inner_state.exp_avg_sq[name], v)
    del saved["reptile_inner_state"]  # a checkpoint from before the state was kept
    torch.save(saved, tmp_path / "old.ckpt")
    assert ReptileLightningModule.load_from_checkpoint(tmp_path / "old.ckpt").meta_learner.inner_state is None


def test_the_loss_after_the_inner_loop_is_computed_on_logging_steps_only(tmp_path, monkeypatch):
    module = ReptileLightningModule(SineMLP(), task="regression", inner_steps=2, inner_lr=0.02, inner_optimizer="sgd")
    asked, meta_step = [], module.meta_learner.meta_step

    def recording(*args, **kwargs):
        asked.append(kwargs["final_loss"])
        return meta_step(*args, **kwargs)

    monkeypatch.setattr(module.meta_learner, "meta_step", recording)
    _trainer(tmp_path, max_steps=5, log_every_n_steps=2).fit(module, _sine_data())
    assert asked == [False, True, False, True, True]  # steps 2 and 4, and the last
