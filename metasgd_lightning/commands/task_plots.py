"""Pictures of adaptation on test tasks: ``metasgd plot-sine`` and ``metasgd plot-tasks``.

- :func:`plot_sine`: the figure of the MAML and Meta-SGD papers, for a checkpoint of any method. For a few test tasks of a sine
  checkpoint: the true curve, the K support points, and the prediction of θ before adaptation, after
  one inner step and after ``eval_inner_steps`` steps.
- :func:`plot_tasks`: one test task of an image checkpoint: its support images by class, its query
  images, and the adapted model's prediction for each (green: correct, red: wrong).

The tasks are those of the checkpoint's own data module (rebuilt from the settings it records), so an
image checkpoint needs its data where it was trained (``--data-root`` points elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from ..methods.contract import check_positive_int
from ..training.figures import pyplot, sine_figure, task_figure
from ._parser import OneLineArgumentParser
from .inference import checkpoint_datamodule, load_meta_learner

__all__ = ["main_sine", "main_tasks", "plot_sine", "plot_tasks"]


def _save(fig, out: str | Path, dpi: int) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out


def plot_sine(checkpoint_path: str | Path, out: str | Path, tasks: int = 4, steps: int | None = None,
              first_task: int = 0, dpi: int = 100) -> Path:
    """Draw the adaptation of a sine (regression) checkpoint on ``tasks`` test tasks, one panel each.

    Args:
        checkpoint_path: a checkpoint of a sine config (e.g. ``configs/sine_5shot.yaml``).
        out: the PNG to write (4 columns of 4 x 3 inches at ``dpi``).
        tasks: how many test tasks to draw.
        steps: the inner steps of the last curve (default: the checkpoint's ``eval_inner_steps``).
        first_task: the index of the first test task drawn.
        dpi: resolution of the image.

    Raises:
        FileNotFoundError: no file at ``checkpoint_path``.
        ValueError: not a checkpoint, a classification checkpoint, or one without a sine data module; a count
            or index out of range.
    """
    check_positive_int("tasks", tasks)
    check_positive_int("first_task", first_task, minimum=0)
    check_positive_int("dpi", dpi)
    module = load_meta_learner(checkpoint_path)
    if module.task != "regression":
        raise ValueError(f"{checkpoint_path} is a classification checkpoint: plot-sine draws regression (sine) "
                         "checkpoints; use plot-tasks for images.")
    datamodule = checkpoint_datamodule(module)
    if not hasattr(datamodule, "ranges"):
        raise ValueError(f"{checkpoint_path} was not trained on sine tasks ({type(datamodule).__name__}).")
    task_set = datamodule.tasks("test", first_task + tasks)
    # The method the checkpoint holds (Meta-SGD, MAML, Reptile), not the class that trains it.
    title = f"{module.method_name}: adaptation on sine test tasks ({Path(checkpoint_path).name})"
    fig = sine_figure(module, task_set, range(first_task, first_task + tasks), datamodule.ranges["x_range"], steps, title)
    return _save(fig, out, dpi)


def plot_tasks(checkpoint_path: str | Path, out: str | Path, task: int = 0, data_root: str | Path | None = None,
               steps: int | None = None, dpi: int = 100) -> Path:
    """Draw one test task of an image checkpoint: support images, query images and the adapted predictions.

    Args:
        checkpoint_path: a checkpoint of an image classification config.
        out: the PNG to write (a row of support images, rows of queries; 1.2 x 1.35 inches per image at ``dpi``,
            4.8 inches wide at least).
        task: the index of the test task.
        data_root: the data folder, if not where the checkpoint's data module read it (``root``).
        steps: inner steps (default: the checkpoint's ``eval_inner_steps``).
        dpi: resolution of the image.

    Raises:
        FileNotFoundError: no file at ``checkpoint_path``.
        ValueError: not a checkpoint, a regression checkpoint, or one whose data module cannot be rebuilt; an
            index out of range.
    """
    from datamodules.episodic import EpisodicDataModule

    check_positive_int("task", task, minimum=0)
    check_positive_int("dpi", dpi)
    module = load_meta_learner(checkpoint_path)
    if module.task != "classification":
        raise ValueError(f"{checkpoint_path} is a regression checkpoint (e.g. sine curves): plot-tasks draws image "
                         "classification checkpoints; use plot-sine for it.")
    if data_root is not None:
        module.datamodule_hparams = {**module.datamodule_hparams, "root": str(data_root)}
    datamodule = checkpoint_datamodule(module, EpisodicDataModule)
    datamodule.setup("test")
    support_x, support_y, query_x, query_y = datamodule.tasks("test", task + 1)[task]
    fig = task_figure(module, (support_x, support_y, query_x, query_y), f"{module.method_name}, test task {task}", steps)
    return _save(fig, out, dpi)


def main_sine(argv: list[str]) -> None:
    parser = OneLineArgumentParser(prog="metasgd plot-sine", description=plot_sine.__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint of a sine config, written by `metasgd fit`")
    parser.add_argument("--out", default="sine.png", help="the image to write (default: sine.png)")
    parser.add_argument("--tasks", type=int, default=4, help="test tasks to draw (default: 4)")
    parser.add_argument("--steps", type=int, default=None, help="inner steps of the last curve (default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        print(f"Wrote {plot_sine(args.checkpoint, args.out, tasks=args.tasks, steps=args.steps)}")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"metasgd plot-sine: {error}") from None


def main_tasks(argv: list[str]) -> None:
    parser = OneLineArgumentParser(prog="metasgd plot-tasks", description=plot_tasks.__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint of an image classification config, written by `metasgd fit`")
    parser.add_argument("--out", default="tasks.png", help="the image to write (default: tasks.png)")
    parser.add_argument("--task", type=int, default=0, help="index of the test task (default: 0)")
    parser.add_argument("--data-root", default=None, help="the data folder, if not the one the checkpoint records")
    parser.add_argument("--steps", type=int, default=None, help="inner steps (default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        print(f"Wrote {plot_tasks(args.checkpoint, args.out, task=args.task, data_root=args.data_root, steps=args.steps)}")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"metasgd plot-tasks: {error}") from None
