"""The Lightning recipe: manual optimisation, evaluation with gradients, checkpoints, divergence, bad input."""

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import SineDataModule
from metasgd_lightning import ConvNet4, InnerLoopDivergedError, MetaSGDLightningModule, SineMLP


def _trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


def _sine_module(**kwargs):
    return MetaSGDLightningModule(SineMLP(), task="regression", init_lr=(0.005, 0.1), **kwargs)


def _sine_data(**kwargs):
    return SineDataModule(**{**dict(meta_batch_size=8, train_tasks_per_epoch=400, val_tasks=64, test_tasks=64), **kwargs})


def test_meta_training_lowers_validation_mse(tmp_path):
    module, data = _sine_module(), _sine_data()
    before = _trainer(tmp_path).validate(module, data, verbose=False)[0]["val/mse"]
    trainer = _trainer(tmp_path, max_steps=150, limit_val_batches=0)
    trainer.fit(module, data)
    after = _trainer(tmp_path).validate(module, data, verbose=False)[0]["val/mse"]
    assert trainer.global_step == 150
    assert after < 0.7 * before, (before, after)


def test_training_step_updates_theta_and_alpha_with_manual_optimisation(tmp_path):
    module = _sine_module()
    assert module.automatic_optimization is False
    before = {k: v.clone() for k, v in module.meta_learner.state_dict().items()}
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, _sine_data())
    after = module.meta_learner.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("lrs.") for k in changed) and any(k.startswith("model.") for k in changed)


def test_a_backward_per_chunk_of_tasks_gives_the_same_meta_gradient(tmp_path):
    weights = []
    for tasks_per_backward in (None, 3):  # 8 tasks: chunks of 3, 3 and 2
        torch.manual_seed(0)
        module = _sine_module(tasks_per_backward=tasks_per_backward)
        _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, _sine_data())
        weights.append(module.meta_learner.state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_lr_meta_lr_gives_alpha_its_own_meta_learning_rate(tmp_path):
    torch.manual_seed(0)
    module = _sine_module(lr_meta_lr=0.05, optimizer=partial(torch.optim.Adam, lr=1e-4))
    before = {k: v.clone() for k, v in module.meta_learner.state_dict().items()}
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, _sine_data())
    groups = module.optimizers().optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-4, 0.05]
    moved = {k: float((v - before[k]).abs().max()) for k, v in module.meta_learner.state_dict().items()}
    # Adam's first step moves every entry by about its group's learning rate.
    assert all(m == pytest.approx(0.05, rel=0.01) for k, m in moved.items() if k.startswith("lrs."))
    assert all(m == pytest.approx(1e-4, rel=0.01) for k, m in moved.items() if k.startswith("model."))
    with pytest.raises(ValueError, match="`lr_meta_lr` sets the meta learning rate of the learned α"):
        MetaSGDLightningModule(SineMLP(), task="regression", init_lr=0.01, learn_lr=False, lr_meta_lr=0.1)


def test_maml_keeps_its_fixed_rate(tmp_path):
    module = _sine_module().__class__(SineMLP(), task="regression", init_lr=0.01, learn_lr=False)
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, _sine_data())
    assert all(float(a) == pytest.approx(0.01) for a in module.meta_learner.lrs.values())


def test_scheduler_and_gradient_clipping(tmp_path):
    from functools import partial

    module = _sine_module(gradient_clip_val=0.5,
                          lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.1))
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(module, _sine_data())
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * 0.01)


def test_evaluation_in_inference_mode_fails_at_once_with_the_fix(tmp_path):
    trainer = _trainer(tmp_path, inference_mode=True)
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer.validate(_sine_module(), _sine_data())


def test_test_reports_mean_and_confidence_interval(tmp_path):
    module = _sine_module()
    metrics = _trainer(tmp_path).test(module, _sine_data(test_tasks=40, meta_batch_size=8), verbose=False)[0]
    per_task = []
    for batch in _sine_data(test_tasks=40, meta_batch_size=8).test_dataloader():
        result = module.meta_learner.adapt_tasks(*batch, module.loss_fn, first_order=True)
        per_task.append(result.query_loss.detach())
    per_task = torch.cat(per_task)
    assert metrics["test/mse"] == pytest.approx(float(per_task.mean()), rel=1e-5)
    assert metrics["test/mse_ci95"] == pytest.approx(float(1.96 * per_task.std() / 40 ** 0.5), rel=1e-4)
    assert module.test_results["mse"]["n"] == 40


class _NaNSineData(SineDataModule):
    """Sine tasks whose training batch number ``bad_batch`` has a NaN target in task 1."""

    def __init__(self, bad_batch: int, **kwargs):
        super().__init__(**kwargs)
        self.bad_batch = bad_batch

    def train_dataloader(self):
        for i, (sx, sy, qx, qy) in enumerate(super().train_dataloader()):
            if i == self.bad_batch:
                sy = sy.clone()
                sy[1, 0, 0] = float("nan")
            yield sx, sy, qx, qy


# Lightning warns that with manual optimisation a step's checkpoint holds the weights after that step: what
# resuming needs, and what this test checks.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization:UserWarning")
@pytest.mark.parametrize("tasks_per_backward", [None, 1])
def test_nan_in_the_inner_loop_stops_training_and_keeps_the_last_checkpoint(tmp_path, tasks_per_backward):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = _trainer(tmp_path, max_steps=10, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint])
    # task 1 of the meta-batch, also when the batch is adapted one task at a time
    with pytest.raises(InnerLoopDivergedError, match=r"training \(global step 3\).*inner step 0 of task 1"):
        trainer.fit(_sine_module(tasks_per_backward=tasks_per_backward),
                    _NaNSineData(bad_batch=3, **dict(meta_batch_size=4, train_tasks_per_epoch=40)))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    restored = MetaSGDLightningModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert torch.equal(restored.meta_learner.lrs["0-weight"], last["state_dict"]["meta_learner.lrs.0-weight"])


def test_load_from_checkpoint_gives_the_same_predictions(tmp_path):
    module = _sine_module()
    trainer = _trainer(tmp_path, max_steps=5, limit_val_batches=0)
    trainer.fit(module, _sine_data())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    # The model and optimiser are stored as configs, so the safe weights_only loading works.
    assert module.hparams["model"] == {"class_path": "metasgd_lightning.methods.models.SineMLP",
                                       "init_args": {"hidden": 40, "in_features": 1, "out_features": 1}}
    restored = MetaSGDLightningModule.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    batch = next(iter(_sine_data().test_dataloader()))
    torch.testing.assert_close(restored.predict_step(batch, 0), module.predict_step(batch, 0), rtol=0, atol=0)
    assert restored.hparams.init_lr == (0.005, 0.1) and restored.task == "regression"


def test_a_checkpoint_of_another_architecture_is_named(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(_sine_module(), _sine_data())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    other = MetaSGDLightningModule(SineMLP(hidden=20), task="regression")
    with pytest.raises(ValueError, match=r"different architecture.*\(40, 1\) in the checkpoint but \(20, 1\) here"):
        _trainer(tmp_path).validate(other, _sine_data(), ckpt_path=tmp_path / "model.ckpt")


def test_predict_step_returns_query_predictions():
    module = MetaSGDLightningModule(ConvNet4(out_features=3, hidden_channels=8), task="classification", init_lr=0.1)
    sx, qx = torch.randn(2, 6, 1, 28, 28), torch.randn(2, 9, 1, 28, 28)
    sy = torch.arange(3).repeat_interleave(2).expand(2, -1)
    predictions = module.predict_step((sx, sy, qx), 0)
    assert predictions.shape == (2, 9) and predictions.dtype == torch.int64 and predictions.max() < 3


class _Once:
    """A loader that yields one given batch, as-is."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        yield self.batch

    def __len__(self):
        return 1


@pytest.mark.parametrize(
    "batch, message",
    [
        ((torch.zeros(4, 5, 1), torch.zeros(4, 5, 1)), "4 tensors"),
        ((torch.zeros(4, 5, 1), torch.zeros(4, 5, 1), torch.zeros(2, 10, 1), torch.zeros(2, 10, 1)), r"query_x must have shape"),
        ((torch.zeros(4, 5, 1), torch.zeros(4, 5), torch.zeros(4, 10, 1), torch.zeros(4, 10)),
         r"SineMLP gives outputs of shape \(1,\) for the examples of the training data, whose targets have shape \(\)"),
        ((torch.zeros(4, 5, 1), torch.zeros(4, 5, 1, dtype=torch.long), torch.zeros(4, 10, 1), torch.zeros(4, 10, 1)),
         "floating-point targets"),
    ],
)
# Training batches only: each fails in the first training step, before any validation.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_bad_batches_are_named(tmp_path, batch, message):
    module = _sine_module()
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, train_dataloaders=_Once(batch))


def test_classification_needs_integer_labels():
    module = MetaSGDLightningModule(ConvNet4(out_features=2, hidden_channels=4), task="classification")
    sx, qx = torch.randn(1, 2, 1, 28, 28), torch.randn(1, 2, 1, 28, 28)
    with pytest.raises(ValueError, match="integer class labels .* got|integer class labels"):
        module.adapt_batch((sx, torch.zeros(1, 2), qx, torch.zeros(1, 2)), "training", steps=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="segmentation"), "`task` must be 'classification' or 'regression'"),
        (dict(eval_inner_steps=0), "`eval_inner_steps` must be a positive integer"),
        (dict(inner_steps=0), "`inner_steps` must be a positive integer"),
        (dict(init_lr=float("inf")), "`init_lr` must be finite"),
        (dict(vectorize="gpu"), "`vectorize` must be"),
        (dict(gradient_clip_val=-1.0), "`gradient_clip_val` must be a positive number or None; got -1.0"),
        (dict(lr_meta_lr=0), "`lr_meta_lr` must be a positive number or None; got 0"),
        (dict(tasks_per_backward=0), "`tasks_per_backward` must be a positive integer or None; got 0"),
    ],
)
def test_bad_module_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaSGDLightningModule(SineMLP(), **{"task": "regression", **kwargs})


def test_step_metrics_are_logged_on_logging_steps_only(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    trainer = _trainer(tmp_path, max_steps=9, limit_val_batches=0, log_every_n_steps=3,
                       logger=CSVLogger(tmp_path, name="csv", version=0))
    trainer.fit(_sine_module(), _sine_data())
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = {key: [int(r["step"]) for r in rows if r.get(key)] for key in
             ("train/mse", "train/support_loss_after", "train/meta_lr", "train/tasks_per_sec")}
    assert steps["train/mse"] == steps["train/support_loss_after"] == steps["train/meta_lr"] == [2, 5, 8]
    assert steps["train/tasks_per_sec"] == [5, 8]  # a rate needs a previous logged step
    assert all(float(r["train/tasks_per_sec"]) > 0 for r in rows if r.get("train/tasks_per_sec"))
