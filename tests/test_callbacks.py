"""MetaSGDCheckpoint takes its metric from the module; LearnedRateMonitor logs every α, per-step rates too."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from metasgd_lightning import MetaSGDLightningModule, SineMLP
from metasgd_lightning.training.callbacks import LearnedRateMonitor, MetaSGDCheckpoint


@pytest.mark.parametrize("task, monitor, mode, sentinel", [("classification", "val/acc", "max", -torch.inf),
                                                           ("regression", "val/mse", "min", torch.inf)])
def test_checkpoint_takes_metric_and_mode_from_the_module(tmp_path, task, monitor, mode, sentinel):
    module = MetaSGDLightningModule(SineMLP(out_features=3 if task == "classification" else 1), task=task)
    callback = MetaSGDCheckpoint(dirpath=tmp_path, save_top_k=2, mode="min")
    assert callback.monitor == "auto"
    trainer = L.Trainer(callbacks=[callback], logger=False, accelerator="cpu", inference_mode=False)
    callback.setup(trainer, module, "fit")
    assert (callback.monitor, callback.mode, callback.save_top_k) == (monitor, mode, 2)
    assert callback.state_dict()["kth_value"] == sentinel  # the worst value of that mode, as ModelCheckpoint sets it
    assert callback.state_key == MetaSGDCheckpoint(dirpath=tmp_path, monitor=monitor, mode=mode, save_top_k=2).state_key
    callback.setup(trainer, module, "validate")  # set up again: nothing changes
    assert (callback.monitor, callback.mode) == (monitor, mode)


def test_checkpoint_with_a_given_metric_keeps_it(tmp_path):
    module = MetaSGDLightningModule(SineMLP(), task="regression")
    callback = MetaSGDCheckpoint(dirpath=tmp_path, monitor="train/mse", mode="min")
    callback.setup(L.Trainer(callbacks=[callback], logger=False, accelerator="cpu"), module, "fit")
    assert (callback.monitor, callback.mode) == ("train/mse", "min")


class _Logger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


@pytest.mark.parametrize("per_step_lr", [False, True])
def test_rate_monitor_logs_every_step_of_per_step_rates(per_step_lr):
    module = MetaSGDLightningModule(SineMLP(hidden=4), task="regression", init_lr=(0.005, 0.1), inner_steps=3,
                                    per_step_lr=per_step_lr)
    meta = module.meta_learner
    logger = _Logger()
    trainer = SimpleNamespace(global_step=10, is_global_zero=True, logger=logger)
    LearnedRateMonitor(every_n_steps=5).on_train_batch_end(trainer, module, None, None, 0)
    [(step, metrics)] = logger.logged
    assert step == 9
    steps = range(3) if per_step_lr else [None]
    for name in meta.adapted_names:
        for k in steps:
            alpha = (meta.lr(name) if k is None else meta.lr(name, k)).detach()
            tag = name if k is None else f"{name}/step{k}"
            assert metrics[f"lr/{tag}/mean"] == pytest.approx(float(alpha.mean()))
            assert metrics[f"lr/{tag}/max"] == pytest.approx(float(alpha.max()))
    assert len(metrics) == 5 * len(meta.adapted_names) * len(steps)
    if per_step_lr:  # three different rates, not step 0's three times
        name = meta.adapted_names[0]
        assert len({metrics[f"lr/{name}/step{k}/mean"] for k in range(3)}) == 3


def test_rate_monitor_interval_is_checked():
    with pytest.raises(ValueError, match="`every_n_steps` must be an integer >= 0; got -1"):
        LearnedRateMonitor(every_n_steps=-1)
