"""``metasgd adapt``, ``metasgd plot-sine`` and ``metasgd plot-tasks`` on tiny checkpoints, as a user runs them.

The commands run in this process (``run_in_process``: what they print and their exit status, without an
interpreter's start-up each); one error of ``adapt`` also in a real process, for its exit status and stderr there."""

import csv
import json
import shutil

import pytest
from PIL import Image

import fixtures_episodic as fx
from conftest import REPO, fit_tiny_omniglot, run_cli, run_in_process
from metasgd_lightning.commands.inference import (
    adapt_to_folder,
    checkpoint_transform,
    load_meta_learner,
    predict_images,
)


@pytest.fixture(scope="module")
def sine_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sine")
    run_in_process("fit", "--config", str(REPO / "configs/sine_5shot.yaml"), "--data.meta_batch_size", "2",
                   "--data.val_tasks", "4", "--trainer.max_steps", "2", "--trainer.enable_model_summary", "false",
                   "--model.eval_inner_steps", "3", "--trainer.default_root_dir", str(tmp_path / "run"), cwd=tmp_path)
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    """A 3-way 1-shot checkpoint trained 2 steps on a small Omniglot-layout folder, and that folder."""
    tmp_path = tmp_path_factory.mktemp("omniglot")
    root = fx.omniglot_folder(tmp_path / "omni", alphabets=2, characters=8)
    fit_tiny_omniglot(root, tmp_path, "--data.queries", "1", "--data.val_tasks", "4",
                      "--model.model.init_args.hidden_channels", "8", "--trainer.default_root_dir", str(tmp_path / "run"))
    return tmp_path / "run" / "checkpoints" / "last.ckpt", root


def test_plot_sine_writes_the_figure(sine_checkpoint, tmp_path):
    proc = run_in_process("plot-sine", str(sine_checkpoint), "--out", str(tmp_path / "sine.png"), cwd=tmp_path)
    assert f"Wrote {tmp_path / 'sine.png'}" in proc.stdout
    assert Image.open(tmp_path / "sine.png").size == (1600, 300)  # 4 tasks of 4 x 3 inches at 100 dpi
    run_in_process("plot-sine", str(sine_checkpoint), "--out", str(tmp_path / "two.png"), "--tasks", "2", cwd=tmp_path)
    assert Image.open(tmp_path / "two.png").size == (800, 300)


def test_plot_tasks_writes_the_figure(omniglot, tmp_path):
    checkpoint, _ = omniglot
    proc = run_in_process("plot-tasks", str(checkpoint), "--out", str(tmp_path / "tasks.png"), cwd=tmp_path)
    assert f"Wrote {tmp_path / 'tasks.png'}" in proc.stdout
    # 3 support and 3 query images: a row of each, 1.35 inches high (+0.4 for the title), 4.8 inches wide at 100 dpi.
    assert Image.open(tmp_path / "tasks.png").size == (480, 310)


def test_plots_refuse_the_other_kind_of_checkpoint(sine_checkpoint, omniglot, tmp_path):
    proc = run_in_process("plot-tasks", str(sine_checkpoint), "--out", str(tmp_path / "x.png"), cwd=tmp_path,
                          check=False)
    assert proc.returncode != 0 and "is a regression checkpoint" in proc.stderr
    proc = run_in_process("plot-sine", str(omniglot[0]), "--out", str(tmp_path / "x.png"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "is a classification checkpoint" in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command, args, message", [
    ("plot-sine", ["--tasks", "0"], "`tasks` must be a positive integer; got 0."),
    ("plot-tasks", ["--task", "-1"], "`task` must be an integer >= 0; got -1."),
])
def test_plots_name_a_count_or_index_out_of_range_before_reading_the_checkpoint(command, args, message, tmp_path):
    proc = run_in_process(command, str(tmp_path / "not-read.ckpt"), *args, cwd=tmp_path, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"metasgd {command}: {message}\n")


@pytest.fixture
def folders(omniglot, tmp_path):
    """support/<3 characters>/one drawing each, and queries/ with two more drawings of each."""
    _, root = omniglot
    return fx.support_and_queries(root, tmp_path)


def test_adapt_gives_the_python_apis_predictions(omniglot, folders, tmp_path):
    checkpoint, _ = omniglot
    support, queries = folders
    proc = run_in_process("adapt", str(checkpoint), "--support", str(support), "--queries", str(queries), "--output",
                          str(tmp_path / "p.csv"), cwd=tmp_path)
    module = load_meta_learner(checkpoint)
    transform = checkpoint_transform(module)
    model, class_names = adapt_to_folder(module, support, transform)
    expected = predict_images(model, queries, transform, class_names)
    assert f"Adapted to 3 classes: {', '.join(class_names)}" in proc.stdout
    with open(tmp_path / "p.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["path"], r["class_name"]) for r in rows] == [(str(p.path), p.class_name) for p in expected]
    assert [float(r["probability"]) for r in rows] == pytest.approx([p.probability for p in expected], abs=1e-5)
    for prediction in expected:  # the printed table
        assert any(line.split() == [str(prediction.path), prediction.class_name, f"{prediction.probability:.2f}"]
                   for line in proc.stdout.splitlines())
    run_in_process("adapt", str(checkpoint), "--support", str(support), "--queries", str(queries), "--output",
                   str(tmp_path / "p.json"), cwd=tmp_path)
    assert [r["class_name"] for r in json.loads((tmp_path / "p.json").read_text())] == [p.class_name for p in expected]


@pytest.mark.cost(4)  # seconds, for the order of the parallel run (conftest.py)
def test_adapt_names_its_errors(omniglot, sine_checkpoint, folders, tmp_path):
    checkpoint, _ = omniglot
    support, queries = folders
    shutil.rmtree(next(support.iterdir()))
    cases = [
        ([str(checkpoint), "--support", str(support), "--queries", str(queries)], "needs 3 class folders; got 2"),
        ([str(sine_checkpoint), "--support", str(support), "--queries", str(queries)], "is a regression checkpoint"),
        ([str(tmp_path / "none.ckpt"), "--support", str(support), "--queries", str(queries)], "No checkpoint at"),
        ([str(checkpoint), "--support", str(support), "--queries", str(queries), "--output", "p.txt"],
         "--output must end in .csv or .json"),
    ]
    for args, message in cases:
        proc = run_in_process("adapt", *args, cwd=tmp_path, check=False)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
        assert proc.stderr.startswith("metasgd adapt: ") and "Traceback" not in proc.stderr
    # The same in a real process: exit status 1 and the one line on stderr, no traceback.
    args, message = cases[2]
    proc = run_cli("adapt", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
    assert proc.stderr.startswith("metasgd adapt: ") and "Traceback" not in proc.stderr
