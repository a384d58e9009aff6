"""The places that use another library's private API, because it has no public one, each isolated in one function.

If one of these tests fails after an upgrade, the library changed the private name the function relies
on: fix the function (its docstring says what it needs), not the test.
"""

import pytest
import torch

from metasgd_lightning.methods.models import TaskBatchNorm2d, functorch_transform_active


def test_torch_still_says_whether_a_functorch_transform_is_running():
    # functorch_transform_active() falls back to True (TaskBatchNorm2d's slower plain-ops path) without it.
    assert callable(getattr(torch._C, "_are_functorch_transforms_active", None)), \
        "torch._C._are_functorch_transforms_active is gone: update _internals.torch_internals.functorch_transform_active"
    assert functorch_transform_active() is False
    seen = []

    def probe(x):
        seen.append(functorch_transform_active())
        return x.sum()

    torch.func.vmap(probe)(torch.zeros(3, 2))
    torch.func.grad(probe)(torch.zeros(2))
    assert seen == [True, True]


def test_task_batch_norm_takes_the_native_kernel_only_outside_transforms(monkeypatch):
    calls = []
    # the native kernel, through F.batch_norm or (on CPU, with the fused double backward) torch.native_batch_norm
    for owner, name in ((torch.nn.functional, "batch_norm"), (torch, "native_batch_norm")):
        native = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, native=native, **k: calls.append(1) or native(*a, **k))
    norm, x = TaskBatchNorm2d(3), torch.randn(4, 3, 5, 5)
    plain = norm(x)
    assert calls == [1]
    batched = torch.func.vmap(norm)(x[None])[0]
    assert calls == [1]  # under vmap: plain tensor ops
    torch.testing.assert_close(plain, batched)



def test_torch_still_has_its_dispatch_mode_for_counting_flops():
    from metasgd_lightning._internals.torch_internals import torch_dispatch_mode

    seen = []

    class Ops(torch_dispatch_mode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func._overloadpacket))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 2, requires_grad=True)
    with Ops():
        torch.autograd.grad(torch.mm(x, x).sum(), x)  # the backward's ops too
    assert seen.count("aten.mm") == 3, seen

# -- ModelCheckpoint and the fit loop (metasgd_lightning.training.callbacks) -------------------------------------------


def test_model_checkpoint_internals_that_last_ckpt_relies_on(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from metasgd_lightning._internals import lightning_internals as li

    for name in ("_monitor_candidates", "_save_last_checkpoint", "_update_best_and_save", "_last_global_step_saved"):
        assert hasattr(ModelCheckpoint(), name), f"ModelCheckpoint.{name} is gone: update lightning_internals"
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True, monitor=None)
    li.reset_checkpoint_monitor(callback, dirpath=tmp_path, save_last=True, monitor="valid_loss", mode="max")
    assert (callback.monitor, callback.mode, float(callback.kth_value)) == ("valid_loss", "max", float("-inf"))

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                assert li.training_batch_progress(trainer).current.ready == 2
                assert "step" in li.monitor_candidates(callback, trainer)
                li.save_last_checkpoint(callback, trainer)
                assert callback._last_global_step_saved != 2  # the mark is put back: validation may still rank

    trainer = L.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Probe(), callback], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="`ModelCheckpoint\\(monitor='valid_loss'\\)` could not find the monitored key"):
        trainer.fit(BoringModel())  # the monitor set above is the live one (BoringModel logs no valid_loss)
    assert (tmp_path / "last.ckpt").is_file() and callback.last_model_path == str(tmp_path / "last.ckpt")
    trainer.callback_metrics["valid_loss"] = torch.tensor(0.5)
    li.rank_and_save(callback, trainer, torch.tensor(0.5))
    assert callback.best_model_path and float(callback.best_model_score) == 0.5
    assert callable(getattr(trainer, "_teardown", None)), "Trainer._teardown is gone: update teardown_trainer"


def test_argparse_still_lists_its_actions():
    import argparse

    from metasgd_lightning._internals.argparse_internals import long_option_strings

    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", "-a")
    parser.add_argument("beta")
    assert isinstance(getattr(parser, "_actions", None), list), "argparse's _actions is gone: update long_option_strings"
    assert long_option_strings(parser) == ["--help", "--alpha"]


def test_lightning_cli_still_records_its_hparams_keys(tmp_path):
    # LightningCLI's convention that load_from_checkpoint and --ckpt_path read: "_instantiator" names the function
    # that rebuilds the module from class_path configs, "_class_path" its class in subclass mode.
    import inspect

    import lightning.pytorch.cli as lightning_cli
    from lightning.pytorch.core import saving

    from metasgd_lightning._internals import lightning_internals as internals

    assert callable(getattr(lightning_cli, "instantiate_module", None)), "lightning.pytorch.cli.instantiate_module moved"
    assert internals._CLI_INSTANTIATOR == f"{lightning_cli.__name__}.instantiate_module"
    for key in (internals._CLASS_PATH_KEY, internals._INSTANTIATOR_KEY):
        assert f'"{key}"' in inspect.getsource(saving), f"Lightning's checkpoint loading no longer reads {key!r}"
    assert f'"{internals._CLASS_PATH_KEY}"' in inspect.getsource(lightning_cli)
    hparams = {"model": {"class_path": "x.Y"}, internals._CLASS_PATH_KEY: "a.B"}
    internals.mark_as_cli_config(hparams)
    assert internals.built_by_cli(hparams) and internals.recorded_class_path(hparams) == "a.B"
    assert internals.recorded_class_path(hparams, pop=True) == "a.B" and internals.recorded_class_path(hparams) is None


def test_lightning_cli_still_hands_its_callbacks_to_instantiate_trainer(monkeypatch):
    import inspect

    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    from metasgd_lightning._internals.lightning_internals import TrainerCallbacksFilter

    monkeypatch.setattr("sys.argv", ["metasgd"])  # the CLI's args are the command line, not pytest's
    hook = getattr(LightningCLI, "_instantiate_trainer", None)
    assert hook is not None and list(inspect.signature(hook).parameters) == ["self", "config", "callbacks"], \
        "LightningCLI._instantiate_trainer changed: update _internals.lightning_internals.TrainerCallbacksFilter"
    seen = []

    class CLI(TrainerCallbacksFilter):
        def add_arguments_to_parser(self, parser):
            parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")

        def trainer_callbacks(self, config, callbacks):
            seen.extend(callbacks)
            return []

    cli = CLI(BoringModel, BoringDataModule, run=False, args=["--trainer.logger", "false"])
    assert [type(c) for c in seen] == [LearningRateMonitor]
    assert not any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)
