"""Using a trained meta-learner: loading, adapting to a new task as a plain nn.Module, plotting its rates."""

import os
import runpy

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import fixtures_episodic as fx
from conftest import REPO, fit_tiny_omniglot, run_in_process
from datamodules import OmniglotDataModule
from datamodules.images import ImageReadError
from datamodules.preprocessing import ImageTransform
from forked_python import run_python
from metasgd_lightning import ConvNet4, MetaSGDLightningModule, SineMLP
from metasgd_lightning.commands.inference import (
    adapt,
    adapt_to_folder,
    checkpoint_transform,
    load_meta_learner,
    load_support_folder,
    predict_images,
)
from metasgd_lightning.commands.plotting import plot_learned_rates


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
    with pytest.raises(ValueError, match=r"^`steps` must be a positive integer or None; got 0\.$"):
        adapt(module, x, y, steps=0)  # not the default steps, which 0 used to give
    with pytest.raises(ValueError, match=r"^`steps` must be a positive integer; got 0\.$"):
        module.adapt_task(x, y, steps=0)


def test_bad_checkpoints_are_named(python_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_meta_learner(tmp_path / "missing.ckpt")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"^{run} is a folder, not a checkpoint file. Give the path of a .ckpt"):
        load_meta_learner(run)
    (run / "checkpoints" / "last.ckpt").write_bytes(python_checkpoint.read_bytes())
    for folder in (run, run / "checkpoints"):  # a run folder, or its checkpoint folder
        with pytest.raises(FileNotFoundError, match=f"^{folder} is a folder, not a checkpoint file: did you mean "
                                                    f"{run / 'checkpoints' / 'last.ckpt'}\\?$"):
            load_meta_learner(folder)
        with pytest.raises(FileNotFoundError, match="is a folder, not a checkpoint file: did you mean"):
            plot_learned_rates(folder, tmp_path / "lrs.png")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint: it is neither a zip archive nor a pickle"):
        load_meta_learner(tmp_path / "notes.txt")
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"not a checkpoint of a meta-learning module \(MetaSGDLightningModule, "
                                         r"MAMLLightningModule, ReptileLightningModule\): it has no meta_learner"):
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
    proc = run_in_process("plot-lrs", str(python_checkpoint), "--out", str(tmp_path / "lrs.png"), cwd=tmp_path)
    assert "Wrote" in proc.stdout
    data = (tmp_path / "lrs.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    bad = run_in_process("plot-lrs", str(tmp_path / "missing.ckpt"), cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "No checkpoint at" in bad.stderr


# -- your own images ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A 3-way Omniglot checkpoint written by `metasgd fit` (2 meta-steps of a tiny ConvNet4), in this process."""
    tmp_path = tmp_path_factory.mktemp("omniglot_fit")
    root = fx.omniglot_folder(tmp_path / "omniglot")
    fit_tiny_omniglot(root, tmp_path, "--data.val_tasks", "2", "--model.model.init_args.hidden_channels", "4",
                      "--trainer.logger", "false", "--checkpoint.dirpath", str(tmp_path / "ckpt"))
    return tmp_path / "ckpt" / "last.ckpt"


def drawings(folder, count, size=20, seed=0):
    """``count`` black-on-white PNG drawings of ``size`` x ``size`` (not 28: the transform must resize them)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(~(rng.random((size, size)) < 0.2)).convert("1").save(folder / f"{i}.png")
    return sorted(folder.glob("*.png"))


def support_folder(root, shots=None):
    """``root/<class>/i.png``; by default 3 classes with 2, 2 and 1 shots, written out of name order."""
    for seed, (name, count) in enumerate((shots or {"beta": 2, "alpha": 2, "gamma": 1}).items()):
        drawings(root / name, count, seed=seed)
    return root


def omniglot_test_pixels(path):
    """Omniglot's test preprocessing written out: grey, Lanczos resize to 28, scaled to [0, 1], inverted."""
    image = Image.open(path).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    return 1.0 - torch.from_numpy(np.array(image, dtype=np.float32) / 255.0)[None]


def test_adapt_to_folder_equals_adapt_on_the_same_tensors(cli_checkpoint, tmp_path):
    support = support_folder(tmp_path / "support")
    queries = drawings(tmp_path / "queries", 3, seed=10) + drawings(tmp_path / "queries" / "more", 1, seed=11)
    module = load_meta_learner(cli_checkpoint)

    # The preprocessing is rebuilt from the checkpoint: Omniglot's, at test time.
    transform = checkpoint_transform(module)
    assert transform.image_size == 28 and transform.channels == 1 and transform.invert and transform.augment is None
    model, class_names = adapt_to_folder(module, support)  # transform rebuilt inside too
    assert class_names == ["alpha", "beta", "gamma"]  # sorted folder names are labels 0, 1, 2
    assert type(model) is ConvNet4 and not isinstance(model, L.LightningModule)

    files = [path for name in class_names for path in sorted((support / name).glob("*.png"))]
    support_x = torch.stack([omniglot_test_pixels(path) for path in files])
    support_y = torch.tensor([0, 0, 1, 1, 2])
    x, y, names = load_support_folder(support, transform)
    torch.testing.assert_close(x, support_x, atol=1e-6, rtol=0)
    assert y.tolist() == support_y.tolist() and names == class_names

    query_x = torch.stack([omniglot_test_pixels(path) for path in queries])
    expected = adapt(module, support_x, support_y)(query_x)
    torch.testing.assert_close(model(query_x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(query_x), module.model(query_x).detach())  # adaptation changed the model

    predictions = predict_images(model, tmp_path / "queries", transform, class_names)
    assert [p.path for p in predictions] == queries  # the folder's images and its subfolder's, sorted
    assert [p.class_name for p in predictions] == [class_names[i] for i in expected.argmax(-1).tolist()]
    probabilities = expected.softmax(-1).max(-1).values
    torch.testing.assert_close(torch.tensor([p.probability for p in predictions]), probabilities, atol=1e-5, rtol=0)


@pytest.mark.cost(3)  # seconds, for the order of the parallel run (conftest.py)
def test_example_script_classifies_query_images(cli_checkpoint, tmp_path, capsys):
    support = support_folder(tmp_path / "support")
    queries = drawings(tmp_path / "queries", 3, seed=10)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    script = REPO / "examples" / "adapt_to_your_images.py"
    proc = run_python([script, cli_checkpoint, support, tmp_path / "queries"], env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "Adapted to 3 classes: alpha, beta, gamma"
    module = load_meta_learner(cli_checkpoint)
    model, class_names = adapt_to_folder(module, support)
    expected = predict_images(model, queries, checkpoint_transform(module), class_names)
    assert lines[1:] == [f"{p.path}\t{p.class_name}\t{p.probability:.2f}" for p in expected]

    # A bad argument gives the message, not a traceback (in-process: a second interpreter costs seconds).
    example = runpy.run_path(str(script))
    assert example["main"]([str(cli_checkpoint), str(tmp_path / "nowhere"), str(queries[0])]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: `folder`: no folder at {tmp_path / 'nowhere'}")


def test_support_folders_that_do_not_fit_are_named(cli_checkpoint, tmp_path):
    module = load_meta_learner(cli_checkpoint)
    with pytest.raises(FileNotFoundError, match="`folder`: no folder at .*one subfolder per class"):
        adapt_to_folder(module, tmp_path / "missing")
    drawings(tmp_path / "flat", 2)
    with pytest.raises(ValueError, match="`folder`: .*flat holds no class folders"):
        adapt_to_folder(module, tmp_path / "flat")
    two = support_folder(tmp_path / "two", {"alpha": 1, "beta": 1})
    with pytest.raises(ValueError, match=r"3-way tasks, so `folder` needs 3 class folders; got 2 in .*two: "
                                         r"\['alpha', 'beta'\]"):
        adapt_to_folder(module, two)
    four = support_folder(tmp_path / "four", {"a": 1, "b": 1, "c": 1, "d": 1})
    with pytest.raises(ValueError, match=r"needs 3 class folders; got 4 in .*: \['a', 'b', 'c', 'd'\]"):
        adapt_to_folder(module, four)
    empty = support_folder(tmp_path / "empty")
    for path in (empty / "beta").iterdir():
        path.unlink()
    (empty / "beta" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['beta'\] in .*empty hold no images"):
        adapt_to_folder(module, empty)
    broken = support_folder(tmp_path / "broken")
    (broken / "gamma" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageReadError, match=f"Cannot read image {broken / 'gamma' / '0.png'}"):
        adapt_to_folder(module, broken)
    with pytest.raises(ValueError, match=r"`folder`: after the transform the images have shape \[1, 20, 20\] "
                                         r"\(\[channels, height, width\]\), but the model takes \[1, 28, 28\]"):
        adapt_to_folder(module, support_folder(tmp_path / "fine"), transform=ImageTransform(None, channels=1))
    mixed = support_folder(tmp_path / "mixed")
    drawings(tmp_path / "other", 1, size=24)[0].rename(mixed / "gamma" / "big.png")
    with pytest.raises(ValueError, match=r"big.png has shape \[1, 24, 24\] but .* has \[1, 20, 20\]"):
        adapt_to_folder(module, mixed, transform=ImageTransform(None, channels=1))


def test_query_images_that_do_not_fit_are_named(cli_checkpoint, tmp_path):
    module = load_meta_learner(cli_checkpoint)
    model, class_names = adapt_to_folder(module, support_folder(tmp_path / "support"))
    queries = drawings(tmp_path / "queries", 2, seed=10)
    transform = checkpoint_transform(module)
    with pytest.raises(ValueError, match=r"`images`: after the transform the images have shape \[3, 32, 32\] "
                                         r"\(\[channels, height, width\]\), but the model takes \[1, 28, 28\]"):
        predict_images(model, queries, ImageTransform(32, channels=3), class_names)
    with pytest.raises(FileNotFoundError, match="`images`: no file or folder at .*missing.png"):
        predict_images(model, [queries[0], tmp_path / "missing.png"], transform, class_names)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="`images`: the folder .*nothing holds no images"):
        predict_images(model, tmp_path / "nothing", transform, class_names)
    with pytest.raises(ValueError, match="`class_names` must name each of the model's 3 outputs; got 2 names"):
        predict_images(model, queries, transform, class_names[:2])
    (tmp_path / "bad.jpg").write_text("not a jpeg")
    with pytest.raises(ImageReadError, match=f"Cannot read image {tmp_path / 'bad.jpg'}"):
        predict_images(model, tmp_path / "bad.jpg", transform, class_names)


def test_a_checkpoint_without_its_data_module_asks_for_a_transform(python_checkpoint, tmp_path):
    support = support_folder(tmp_path / "support")
    module = load_meta_learner(python_checkpoint)  # saved from Python, with no data module
    with pytest.raises(ValueError, match="records no data module.*Pass .* as `transform`"):
        adapt_to_folder(module, support)
    transform = OmniglotDataModule(image_size=28).transform("test")
    model, class_names = adapt_to_folder(python_checkpoint, support, transform=transform)
    assert class_names == ["alpha", "beta", "gamma"] and type(model) is ConvNet4

    checkpoint = torch.load(python_checkpoint, weights_only=True)
    recorded = {"image_size": 28, "invert": True}
    for hparams, message in [
        (recorded, "records its data module's arguments but not its class"),
        ({**recorded, "_class_path": "datamodules.SineDataModule"}, "SineDataModule, which is not an imported image"),
        ({**recorded, "_class_path": "someone.else.Module"}, "someone.else.Module, which is not an imported image"),
        ({"image_size": 0, "_class_path": "datamodules.OmniglotDataModule"},
         "cannot be rebuilt from the recorded arguments .*`image_size` must be an integer >= 1"),
    ]:
        torch.save({**checkpoint, "datamodule_hyper_parameters": hparams}, tmp_path / "edited.ckpt")
        with pytest.raises(ValueError, match=message + ".*transform="):
            checkpoint_transform(tmp_path / "edited.ckpt")
    omniglot = {**recorded, "_class_path": "datamodules.OmniglotDataModule", "rotations": False}
    torch.save({**checkpoint, "datamodule_hyper_parameters": omniglot}, tmp_path / "edited.ckpt")
    assert repr(checkpoint_transform(tmp_path / "edited.ckpt")) == repr(transform)

    regression = MetaSGDLightningModule(SineMLP(), task="regression")
    with pytest.raises(ValueError, match="needs a classification model; this one was meta-trained for regression"):
        adapt_to_folder(regression, support, transform=transform)
