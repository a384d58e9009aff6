"""Every method's checkpoint through every command: Meta-SGD, MAML and Reptile, as a user runs them.

Tiny checkpoints of each method (2 meta-steps) on sine and on a small Omniglot-layout folder, written by
``metasgd fit``, go through ``load_meta_learner``, ``adapt``, ``adapt_to_folder``, ``metasgd adapt``,
``metasgd plot-sine``, ``metasgd plot-tasks``, ``metasgd test``, ``metasgd plot-lrs`` and the TensorBoard
figure of adaptation. The commands run in this process (their ``main(argv)``), which is far faster than
a subprocess per call; one subprocess checks the one line ``plot-lrs`` prints for Reptile.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import fixtures_episodic as fx
from conftest import REPO, run_in_process
from datamodules import SineDataModule
from metasgd_lightning import (
    MAMLLightningModule,
    MetaSGDLightningModule,
    ReptileLightningModule,
    SineMLP,
)
from metasgd_lightning.commands import adapt_command, cli, plotting
from metasgd_lightning.commands.inference import (
    adapt,
    adapt_to_folder,
    checkpoint_datamodule,
    checkpoint_module_class,
    load_meta_learner,
)
from metasgd_lightning.training.tensorboard_views import TensorBoardViews

METHODS = ("Meta-SGD", "MAML", "Reptile")
CLASSES = {"Meta-SGD": MetaSGDLightningModule, "MAML": MAMLLightningModule, "Reptile": ReptileLightningModule}

# Reptile's config is written here, with only the arguments its module is sure to keep: the shipped Reptile
# configs belong to its own tuning.
REPTILE = {"class_path": "metasgd_lightning.ReptileLightningModule",
           "init_args": {"inner_optimizer": "adam", "inner_lr": 0.001, "inner_steps": 2, "eval_inner_steps": 3}}
SINE_DATA = {"class_path": "datamodules.SineDataModule", "init_args": {"shots": 5, "queries": 10}}
TINY = ["--trainer.max_steps", "2", "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar",
        "false", "--lr_monitor.every_n_steps", "0", "--tensorboard.figures_every_n_validations", "0"]
SINE_TINY = ["--data.meta_batch_size", "2", "--data.val_tasks", "4", "--data.test_tasks", "4"]
IMAGE_TINY = ["--data.layout", "folder", "--data.fractions", "[0.5, 0.25, 0.25]", "--data.ways", "3",
              "--data.download", "false", "--data.queries", "1", "--data.meta_batch_size", "2", "--data.val_tasks",
              "2", "--data.test_tasks", "2", "--data.num_workers", "0"]


def _config(folder: Path, name: str, model: dict, data: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"inference_mode": False}, "model": model, "data": data}))
    return path


def _sine_configs(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """Each method's sine config and the arguments that make it tiny."""
    reptile = {**REPTILE, "init_args": {**REPTILE["init_args"], "inner_optimizer": "sgd", "inner_lr": 0.02,
                                        "model": {"class_path": "metasgd_lightning.SineMLP"}}}
    return {
        "Meta-SGD": (REPO / "configs/sine_5shot.yaml", ["--model.inner_steps", "1", "--model.eval_inner_steps", "2"]),
        "MAML": (REPO / "configs/maml_sine.yaml", ["--model.init_args.eval_inner_steps", "2"]),
        "Reptile": (_config(folder, "reptile_sine", reptile, SINE_DATA), []),
    }


def _image_configs(folder: Path, root: Path) -> dict[str, tuple[Path, list[str]]]:
    """Each method's Omniglot config (3-way, ConvNet4 with 8 channels) and the arguments that make it tiny."""
    convnet = {"class_path": "metasgd_lightning.ConvNet4",
               "init_args": {"in_channels": 1, "hidden_channels": 8, "image_size": 28, "downsample": "stride"}}
    reptile = {**REPTILE, "init_args": {**REPTILE["init_args"], "model": convnet}}
    data = {"class_path": "datamodules.OmniglotDataModule", "init_args": {"root": str(root)}}
    return {
        "Meta-SGD": (REPO / "configs/omniglot_5way_1shot.yaml", ["--model.model.init_args.hidden_channels", "8"]),
        "MAML": (REPO / "configs/maml_omniglot_5way_1shot.yaml",
                 ["--model.init_args.model.init_args.hidden_channels", "8"]),
        "Reptile": (_config(folder, "reptile_omniglot", reptile, data), []),
    }


def _metasgd(*args: str) -> None:
    """``metasgd ARGS`` in this process (LightningCLI warns when the process's own argv is not the command's)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["metasgd"])
        cli.main(list(args))


def _fit(config: Path, extra: list[str], root: Path) -> Path:
    _metasgd("fit", "--config", str(config), *TINY, *extra, "--trainer.default_root_dir", str(root))
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def sine(tmp_path_factory):
    """A sine checkpoint of each method, written by ``metasgd fit`` (2 meta-steps of 2 tasks), and its config."""
    folder = tmp_path_factory.mktemp("sine")
    configs = _sine_configs(folder)
    return {method: (_fit(config, [*SINE_TINY, *extra], folder / method), config, extra)
            for method, (config, extra) in configs.items()}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 3-way 1-shot Omniglot checkpoint of each method (2 meta-steps of 2 tasks), and the data folder."""
    folder = tmp_path_factory.mktemp("image")
    root = fx.omniglot_folder(folder / "omni", alphabets=2, characters=8)
    configs = _image_configs(folder, root)
    checkpoints = {method: _fit(config, [*IMAGE_TINY, "--data.root", str(root), *extra], folder / method)
                   for method, (config, extra) in configs.items()}
    return checkpoints, root


@pytest.fixture(scope="module")
def folders(image, tmp_path_factory):
    """support/<3 characters>/one drawing each, and queries/ with two more drawings of each."""
    _, root = image
    return fx.support_and_queries(root, tmp_path_factory.mktemp("folders"))


# -- loading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_load_meta_learner_rebuilds_the_method(method, sine, image):
    for path in (sine[method][0], image[0][method]):
        module = load_meta_learner(path)
        assert type(module) is CLASSES[method] and module.method_name == method and not module.training
        saved = torch.load(path, weights_only=True)
        assert saved["meta_learning_module"] == f"{CLASSES[method].__module__}.{CLASSES[method].__qualname__}"
        torch.testing.assert_close(module.state_dict(), saved["state_dict"])
    if method == "MAML":
        assert module.inner_lr == 0.4 and module.eval_inner_steps == 3 and not module.meta_learner.learn_lr


@pytest.mark.parametrize("method", METHODS)
def test_older_checkpoints_without_a_recorded_class_are_inferred(method, sine, tmp_path):
    checkpoint = torch.load(sine[method][0], weights_only=True)
    del checkpoint["meta_learning_module"]
    # Written by `metasgd fit` from a config that names its class (MAML, Reptile): the hyperparameters' _class_path.
    assert checkpoint_module_class(checkpoint) is CLASSES[method]
    checkpoint["hyper_parameters"].pop("_class_path", None)
    # Neither: Reptile by its inner optimiser, Meta-SGD (and MAML of before MAMLLightningModule) by its rates.
    assert checkpoint_module_class(checkpoint) is (ReptileLightningModule if method == "Reptile" else MetaSGDLightningModule)


@pytest.mark.parametrize("name", ["sine.ckpt", "omniglot.ckpt"])
def test_checkpoints_of_before_the_split_still_load(name):
    module = load_meta_learner(REPO / "tests/fixtures/before_split" / name)
    assert type(module) is MetaSGDLightningModule and module.method_name == "Meta-SGD"


def test_a_recorded_class_is_resolved_only_among_imported_meta_learning_modules(sine, tmp_path):
    checkpoint = torch.load(sine["MAML"][0], weights_only=True)
    for recorded in ("os.system", "collections.OrderedDict", "not_imported_package_xyz.Module",
                     "metasgd_lightning.SineMLP"):
        checkpoint["meta_learning_module"] = recorded
        with pytest.raises(ValueError, match="not an imported subclass of metasgd_lightning.MetaLearningModule"):
            checkpoint_module_class(checkpoint, "x.ckpt")
    assert "not_imported_package_xyz" not in sys.modules
    checkpoint["meta_learning_module"] = "metasgd_lightning.module.MAMLLightningModule"  # an old module path
    assert checkpoint_module_class(checkpoint) is MAMLLightningModule


def test_a_maml_checkpoint_of_a_module_built_in_python_loads_as_maml(tmp_path):
    import lightning as L

    module = MAMLLightningModule(SineMLP(), task="regression", inner_lr=0.02, inner_steps=2, eval_inner_steps=5)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "maml.ckpt")
    for loaded in (MAMLLightningModule.load_from_checkpoint(tmp_path / "maml.ckpt"), load_meta_learner(tmp_path / "maml.ckpt")):
        assert type(loaded) is MAMLLightningModule
        assert (loaded.inner_lr, loaded.meta_learner.inner_steps, loaded.eval_inner_steps) == (0.02, 2, 5)
    with pytest.raises(ValueError, match="`inner_lr` must be one positive number.*MetaSGDLightningModule"):
        MAMLLightningModule(SineMLP(), inner_lr=(0.005, 0.1))
    with pytest.raises(TypeError):
        MAMLLightningModule(SineMLP(), learn_lr=True)  # MAML's signature has no learned-rate options


# -- adapting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_adapt_fits_a_sine_task(method, sine):
    module = load_meta_learner(sine[method][0])
    x = torch.linspace(-5, 5, 10)[:, None]
    y = 2.0 * torch.sin(x - 1.0)
    model = adapt(module, x, y, steps=5)
    assert type(model) is SineMLP and not any(p.requires_grad for p in model.parameters())
    assert not torch.allclose(model(x), module.model(x).detach())  # the weights moved


@pytest.mark.parametrize("method", METHODS)
def test_adapt_to_folder_and_metasgd_adapt(method, image, folders, tmp_path, capsys):
    checkpoint = image[0][method]
    support, queries = folders
    model, class_names = adapt_to_folder(checkpoint, support)
    assert len(class_names) == 3 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    code = adapt_command.main([str(checkpoint), "--support", str(support), "--queries", str(queries), "--output",
                               str(tmp_path / "p.csv")])
    out = capsys.readouterr().out
    assert code == 0 and f"Adapted to 3 classes: {', '.join(class_names)}" in out
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 6


# -- plots and the TensorBoard figure -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_plot_sine(method, sine, tmp_path, capsys, monkeypatch):
    titles = _record_titles(monkeypatch)
    cli.main(["plot-sine", str(sine[method][0]), "--out", str(tmp_path / "sine.png"), "--tasks", "2"])
    assert f"Wrote {tmp_path / 'sine.png'}" in capsys.readouterr().out
    assert Image.open(tmp_path / "sine.png").size == (800, 300)
    assert titles == [f"{method}: adaptation on sine test tasks (last.ckpt)"]


@pytest.mark.parametrize("method", METHODS)
def test_plot_tasks(method, image, tmp_path, capsys, monkeypatch):
    titles = _record_titles(monkeypatch)
    cli.main(["plot-tasks", str(image[0][method]), "--out", str(tmp_path / "tasks.png")])
    assert f"Wrote {tmp_path / 'tasks.png'}" in capsys.readouterr().out
    assert Image.open(tmp_path / "tasks.png").size == (480, 310)
    assert titles[0].startswith(f"{method}, test task 0: ")


def test_plot_lrs_draws_meta_sgd_rates_and_maml_fixed_rate(sine, tmp_path, capsys, monkeypatch):
    titles = _record_titles(monkeypatch)
    for method in ("Meta-SGD", "MAML"):
        plotting.main([str(sine[method][0]), "--out", str(tmp_path / f"{method}.png")])
        assert Image.open(tmp_path / f"{method}.png").size[0] > 300
    assert titles[0].startswith("Meta-SGD: learned inner-loop rates α per parameter tensor")
    assert titles[1].startswith("MAML: fixed inner-loop rate α = 0.01 for every parameter (not learned)")
    with pytest.raises(SystemExit, match=r"^metasgd plot-lrs: .*last.ckpt is a Reptile checkpoint; Reptile learns no "
                                         r"inner-loop rates \(its inner optimiser is SGD with lr 0.02\)\.$"):
        plotting.main([str(sine["Reptile"][0]), "--out", str(tmp_path / "reptile.png")])
    assert not (tmp_path / "reptile.png").exists()


def test_plot_lrs_says_in_one_line_that_reptile_learns_no_rates(image, tmp_path):
    checkpoint = image[0]["Reptile"]
    # In this process: that a real process adds nothing of its own to a one-line error (no import-time noise) is
    # tested on `metasgd fit` (test_user_errors.py) and on the imports (test_cli.py).
    proc = run_in_process("plot-lrs", str(checkpoint), "--out", str(tmp_path / "lrs.png"), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"metasgd plot-lrs: {checkpoint} is a Reptile checkpoint; Reptile learns no inner-loop "
                           "rates (its inner optimiser is Adam with lr 0.001).\n")


@pytest.mark.parametrize("method", METHODS)
def test_tensorboard_figure_of_adaptation(method, sine, image, monkeypatch):
    for path in (sine[method][0], image[0][method]):
        module = load_meta_learner(path)
        datamodule = checkpoint_datamodule(module)
        datamodule.setup("validate")
        figures = []
        writer = types.SimpleNamespace(add_figure=lambda tag, figure, global_step, close, figures=figures: figures.append(
            (tag, figure._suptitle.get_text())))
        trainer = types.SimpleNamespace(datamodule=datamodule, global_step=2)
        views = TensorBoardViews(figure_tasks=2)
        with _no_warnings(monkeypatch):
            views._log_figure(trainer, module, writer, 1)
        assert [(tag, title.split(" at ")[0]) for tag, title in figures] == [
            ("adaptation/validation tasks",
             f"{method}: validation tasks" if module.task == "regression" else f"{method}, validation task 0")]


# -- metasgd test ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_metasgd_test(method, sine, tmp_path, capsys):
    checkpoint, config, extra = sine[method]
    _metasgd("test", "--config", str(config), *TINY, *SINE_TINY, *extra, "--ckpt_path", str(checkpoint),
             "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
             "--checkpoint.dirpath", str(checkpoint.parent))  # where it was: Lightning warns of a moved folder
    out = capsys.readouterr().out
    assert f"Method: {method} ({CLASSES[method].__name__})" in out and "Test mse:" in out and "95% CI" in out


@pytest.mark.parametrize("method", METHODS)
def test_metasgd_predict_saves_what_test_scores(method, sine, tmp_path, capsys):
    checkpoint, config, extra = sine[method]
    common = ["--config", str(config), *TINY, *SINE_TINY, *extra, "--ckpt_path", str(checkpoint),
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
              "--checkpoint.dirpath", str(checkpoint.parent)]
    _metasgd("test", *common)
    test_mse = float(capsys.readouterr().out.split("Test mse: ")[1].split()[0])
    _metasgd("predict", *common)
    out = capsys.readouterr().out
    assert f"Weights: {checkpoint} (step 2)" in out
    assert f"Predictions: outputs for 4 test tasks, a tensor of shape [4, 10, 1] (tasks, queries, outputs): " \
           f"{tmp_path / 'predictions.pt'} (torch.load)." in out
    predictions = torch.load(tmp_path / "predictions.pt")
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    module = SineDataModule(**{**data, "meta_batch_size": 2, "val_tasks": 4, "test_tasks": 4})
    module.setup("test")
    query_y = torch.cat([batch[3] for batch in module.test_dataloader()])
    per_task = ((predictions - query_y) ** 2).mean(dim=(1, 2))  # the tasks test scored, in its order
    assert float(per_task.mean()) == pytest.approx(test_mse, abs=1e-4)


# -- helpers ------------------------------------------------------------------------------------------


def _record_titles(monkeypatch) -> list[str]:
    """Collect the suptitle of every figure the plot commands save."""
    from matplotlib.figure import Figure

    titles: list[str] = []
    savefig = Figure.savefig

    def recording(self, *args, **kwargs):
        titles.append(self._suptitle.get_text() if self._suptitle is not None else "")
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return titles


class _no_warnings:
    """Fail on the warning TensorBoardViews gives instead of a figure (it never raises)."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        from metasgd_lightning.training import tensorboard_views

        def fail(message, *args, **kwargs):
            raise AssertionError(message)

        self.monkeypatch.setattr(tensorboard_views, "rank_zero_warn", fail)

    def __exit__(self, *exc):
        return False
