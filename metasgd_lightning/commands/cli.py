"""The ``metasgd`` command: a LightningCLI over :class:`MetaSGDLightningModule` and the data modules.

    metasgd fit --config configs/sine_5shot.yaml
    metasgd fit --config configs/sine_5shot.yaml --ckpt_path last     # resume
    metasgd fit --config configs/reptile_sine.yaml                    # Reptile: the config names its module class
    metasgd fit --config configs/maml_sine.yaml                       # MAML, likewise
    metasgd test --config configs/sine_5shot.yaml --ckpt_path runs/sine_5shot/checkpoints/last.ckpt
    metasgd plot-lrs runs/sine_5shot/checkpoints/last.ckpt --out lrs.png
    metasgd plot-sine runs/sine_5shot/checkpoints/last.ckpt --out sine.png
    metasgd plot-tasks runs/omniglot_5way_1shot/checkpoints/last.ckpt --out tasks.png
    metasgd adapt runs/omniglot_5way_1shot/checkpoints/last.ckpt --support support/ --queries queries/
"""

from __future__ import annotations

import gc
import importlib
import os
import shlex
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only

import datamodules  # noqa: F401  (registers the data modules for `--data`)

from .._internals.lightning_internals import TrainerCallbacksFilter
from ..training import MetaLearningModule, MetaSGDLightningModule
from ..training.callbacks import LearnedRateMonitor, MetaSGDCheckpoint
from ..training.checkpointing import (
    AtomicCheckpointIO,
    CheckpointCorruptError,
    best_checkpoint,
    checkpoint_is_intact,
    last_checkpoint,
    resolve_resume_path,
)
from ..training.progress import MetaProgressBar
from ..training.tensorboard_views import MetaTensorBoardLogger, TensorBoardViews
from ._errors import UserError, refused_arguments, show_tracebacks, user_error_message
from ._module_class import module_forms_conflict, names_module_class
from ._parser import MetaSGDArgumentParser
from ._quiet import silence_lightning_noise

__all__ = ["MetaSGDCLI", "main", "program"]


class MetaSGDCLI(TrainerCallbacksFilter):
    """LightningCLI with Meta-SGD's defaults: gradients at evaluation, last and best checkpoints.

    Arguments that name the module's class (``model: {class_path: ...ReptileLightningModule}`` or
    ``...MAMLLightningModule`` in a config, ``--model CLASS``) select it among the
    :class:`MetaLearningModule` subclasses; otherwise the
    module is :class:`MetaSGDLightningModule`, parsed as it always was (see ``_module_class.py``).
    """

    def __init__(self, model_class=MetaSGDLightningModule, *args, **kwargs) -> None:
        argv = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
        if model_class is MetaSGDLightningModule and isinstance(argv, (list, tuple)) and names_module_class(argv):
            conflict = module_forms_conflict(argv)
            if conflict:
                raise UserError(conflict)
            model_class, kwargs["subclass_mode_model"] = MetaLearningModule, True
        super().__init__(model_class, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # Values that data and model share are typed once, on the data module: whether its tasks are
        # classification or regression, and (classification) the number of ways = the model's outputs.
        model = "model.init_args" if self.subclass_mode_model else "model"
        parser.link_arguments("data.task", f"{model}.task", apply_on="instantiate")
        parser.link_arguments("data.ways", f"{model}.model.init_args.out_features", apply_on="instantiate")
        parser.add_lightning_class_args(MetaSGDCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearnedRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(MetaProgressBar, "progress")
        parser.add_lightning_class_args(TensorBoardViews, "tensorboard")
        # A second run into the same folder overwrites last.ckpt (and a best checkpoint of the same step) instead of
        # writing last-v1.ckpt beside it: last.ckpt is always the newest run's, as the README's commands assume.
        parser.set_defaults({"checkpoint.enable_version_counter": False})

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the model's settings from a given checkpoint next: refuse a missing or broken one by name.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._given_model = None
        if not path or str(path) in ("last", "best", "hpc", "registry") or "://" in str(path):
            return
        if not Path(path).is_file():
            where = "a folder, not a checkpoint file" if Path(path).is_dir() else "no such file"
            raise UserError(f"--ckpt_path {path}: {where}. Give a .ckpt file written by `metasgd fit` (e.g. "
                            "runs/<name>/checkpoints/last.ckpt), or `last` for the newest in the run's checkpoint folder.")
        if not checkpoint_is_intact(path):
            raise CheckpointCorruptError(path)
        self._given_model = _plain(self.config[subcommand].get("model"))  # before the checkpoint's replace them

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            refused = refused_arguments(error)
            if refused is None:
                raise
            raise refused from error

    def before_instantiate_classes(self) -> None:
        # LightningCLI has just replaced the module's settings with those a --ckpt_path file records: say which
        # settings given on the command line or in the config were overridden.
        config = self.config[self.subcommand] if self.subcommand else self.config
        given, used = getattr(self, "_given_model", None), _plain(config.get("model"))
        if isinstance(given, dict) and isinstance(used, dict):
            given, used = given.get("init_args", given), used.get("init_args", used)
            changed = [f"{key} {used[key]!r} (given {value!r})" for key, value in given.items()
                       if key in used and key not in ("task",) and used[key] != value and not isinstance(value, dict)]
            if changed:
                _say(f"metasgd {self.subcommand}: --ckpt_path keeps the checkpoint's settings: {'; '.join(changed)}. "
                     "To change them, resume with --ckpt_path last (which keeps the given settings) or start a new run.")
        # Checkpoints go where the run goes: <default_root_dir>/checkpoints (the working folder without one),
        # unless --checkpoint.dirpath names a folder; a fixed folder, so that `--ckpt_path last` finds last.ckpt.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("checkpoint") is not None and config.get("checkpoint.dirpath") is None:
            root = config.get("trainer.default_root_dir") or os.getcwd()
            config["checkpoint.dirpath"] = str(Path(root) / "checkpoints")

    def instantiate_trainer(self, **kwargs):
        # Checkpoints are written atomically unless the config names a CheckpointIO plugin of its own.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        plugins = (config.get("trainer") or {}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer = super().instantiate_trainer(**kwargs, plugins=plugins)
        if (config.get("trainer") or {}).get("logger") in (None, True) and type(trainer.logger) is TensorBoardLogger:
            # Lightning's default logger, without the scalars that would come first on TensorBoard's scalars page.
            trainer.logger = MetaTensorBoardLogger(save_dir=trainer.default_root_dir, version=SLURMEnvironment.job_id())
        return trainer

    def trainer_callbacks(self, config, callbacks):
        # The progress bar of `--progress.*` gives way to `enable_progress_bar: false` and to a progress bar
        # callback of the config's own.
        given = config.get("callbacks") or []
        own = [c for c in (given if isinstance(given, list) else [given]) if isinstance(c, ProgressBar)]
        if config.get("enable_progress_bar") is False or own:
            callbacks = [c for c in callbacks if not isinstance(c, MetaProgressBar)]
        return callbacks

    def fit(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        # `--ckpt_path last` finds the newest last*.ckpt in the checkpoint folder (or starts fresh, saying so),
        # and a truncated or corrupt file is refused before any process or worker starts.
        checkpoint = self.trainer.checkpoint_callback
        folder = getattr(checkpoint, "dirpath", None)
        if isinstance(checkpoint, MetaSGDCheckpoint):
            checkpoint.watch_signals(self.trainer)  # a stop signal during data set-up stops the run too
        if str(ckpt_path) == "best":
            best = best_checkpoint(folder) if folder is not None else None
            file = f"its file: {best}" if best else "its .ckpt file (none is ranked best in the checkpoint folder yet)"
            raise UserError("--ckpt_path best: fit resumes from `last` (the run's newest state) or from a checkpoint "
                            f"file; to resume from the best, give {file}.")
        if ckpt_path is None and folder is not None and last_checkpoint(folder) is not None:
            # A fresh run into a folder with an earlier run's checkpoints: say what happens to them.
            _say(f"metasgd fit: {folder} already holds checkpoints of an earlier run; this run starts from scratch and "
                 "overwrites last.ckpt. To continue that run instead, add --ckpt_path last; to keep both, give this "
                 "run another --trainer.default_root_dir.")
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_resume_path(ckpt_path, folder), **kwargs)

    def validate(self, model, datamodule=None, ckpt_path=None, **kwargs):
        path = self._evaluated_checkpoint("validate", ckpt_path)
        return self.trainer.validate(model, datamodule=datamodule, ckpt_path=path, **kwargs)

    def test(self, model, datamodule=None, ckpt_path=None, **kwargs):
        path = self._evaluated_checkpoint("test", ckpt_path)
        return self.trainer.test(model, datamodule=datamodule, ckpt_path=path, **kwargs)

    def predict(self, model, datamodule=None, ckpt_path=None, **kwargs):
        if self.trainer.world_size > 1:
            raise UserError(f"predict runs on one process (given {self.trainer.world_size}), so that its file holds "
                            "the test tasks in order: add --trainer.devices 1 --trainer.num_nodes 1.")
        path = self._evaluated_checkpoint("predict", ckpt_path)
        predictions = self.trainer.predict(model, datamodule=datamodule, ckpt_path=path, **kwargs)
        _save_predictions(self.trainer, predictions)
        return predictions

    def _evaluated_checkpoint(self, command: str, ckpt_path):
        """The checkpoint ``validate``/``test``/``predict`` use: ``last`` or ``best`` found in the run's folder; none
        said plainly."""
        folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        if ckpt_path is None:
            verb = "predicts with" if command == "predict" else "scores"
            _say(f"metasgd {command}: no --ckpt_path, so this {verb} the untrained model (its initial weights). To use "
                 f"a trained one, add --ckpt_path <run>/checkpoints/last.ckpt (or --ckpt_path last).")
            return None
        if str(ckpt_path) in ("last", "best"):
            which = str(ckpt_path)
            last = last_checkpoint(folder) if folder is not None else None
            if last is None:
                raise UserError(f"--ckpt_path {which}: no checkpoint in {folder or 'the checkpoint folder'}. Give the "
                                "run's --trainer.default_root_dir (or --checkpoint.dirpath), or a .ckpt file.")
            found = last if which == "last" else best_checkpoint(folder)
            if found is None:
                raise UserError(f"--ckpt_path best: {last} names no best checkpoint that is in {folder} and intact. "
                                "Give a .ckpt file, or --ckpt_path last.")
            return resolve_resume_path(str(found), folder)
        return resolve_resume_path(ckpt_path, folder)

    def after_fit(self) -> None:
        trainer, module = self.trainer, self.trainer.lightning_module
        # MetaSGDCheckpoint has Lightning validate the final weights inside fit; when that epoch does not
        # validate (check_val_every_n_epoch), score them here and rank them among the best checkpoints.
        if not trainer.interrupted and trainer.limit_val_batches and module.last_validated_step != trainer.global_step:
            trainer.validate(module, datamodule=self.datamodule, verbose=False)
            if isinstance(trainer.checkpoint_callback, MetaSGDCheckpoint):
                trainer.checkpoint_callback.rank_validation(trainer)
        _print_summary(self.trainer, "fit")

    def after_validate(self) -> None:
        _print_summary(self.trainer, "validate")

    def after_test(self) -> None:
        _print_summary(self.trainer, "test")


def _plain(value):
    """A jsonargparse Namespace as nested dicts (lists for tuples), for comparing settings."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@rank_zero_only
def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@rank_zero_only
def _print_summary(trainer, stage: str) -> None:
    module = trainer.lightning_module
    prefix = "test" if stage == "test" else "val"
    # The method first (Meta-SGD, MAML or Reptile), then its class: a MAML run is not "MetaSGDLightningModule".
    lines = [f"Method: {getattr(module, 'method_name', type(module).__name__)} ({type(module).__name__})"]
    if stage != "fit":  # which weights were scored: the trainer's own step count is 0 outside fit
        lines.append(_scored_weights(trainer.ckpt_path))
    for name in module.metric_names:
        key = f"{prefix}/{name}"
        if key in trainer.callback_metrics:
            value, ci = float(trainer.callback_metrics[key]), trainer.callback_metrics.get(f"{key}_ci95")
            ci_text = f" ± {float(ci):.4f} (95% CI over tasks)" if ci is not None else ""
            label = {"fit": "Final validation", "validate": "Validation", "test": "Test"}[stage]
            lines.append(f"{label} {name}: {value:.4f}{ci_text}")
    task_names = getattr(trainer.datamodule, "task_names", None)
    if stage == "test" and task_names and "acc" in module.test_results:
        published = getattr(trainer.datamodule, "published_error_rates", None)
        lines += _per_task_errors(task_names, module.test_results["acc"]["values"], published)
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None):
        lines.append(f"TensorBoard logs: {os.path.abspath(logger.log_dir)}")
    checkpoint = trainer.checkpoint_callback
    if stage == "fit" and checkpoint is not None and checkpoint.dirpath:
        last = Path(checkpoint.last_model_path).name or "last.ckpt"
        best = Path(checkpoint.best_model_path).name or "none yet"
        lines.append(f"Checkpoints: {os.path.abspath(checkpoint.dirpath)} ({last}; best: {best})")
    if logger is not None and getattr(logger, "save_dir", None):
        lines.append(f"Watch them: {tensorboard_command()} --logdir {shlex.quote(os.path.abspath(logger.save_dir))}")
    print("\n".join(lines), flush=True)


def _save_predictions(trainer, predictions) -> None:
    """``metasgd predict``: the predictions for the data module's test tasks, one tensor in the run's folder."""
    if not predictions:
        raise UserError("predict returned no predictions (`return_predictions` off, or no test tasks): nothing saved.")
    if isinstance(predictions[0], list):  # several predict dataloaders: the first
        predictions = predictions[0]
    stacked = torch.cat([p.cpu() for p in predictions])
    path = Path(trainer.default_root_dir).resolve() / "predictions.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stacked, path)
    what = "class indices" if trainer.lightning_module.task == "classification" else "outputs"
    print(f"{_scored_weights(trainer.ckpt_path)}\nPredictions: {what} for {stacked.shape[0]} test tasks, a tensor of "
          f"shape {list(stacked.shape)} (tasks, queries{', outputs' if what == 'outputs' else ''}): {path} "
          "(torch.load). For your own images: metasgd adapt.", flush=True)


def _scored_weights(ckpt_path) -> str:
    if not ckpt_path:
        return "Weights: untrained (no --ckpt_path)"
    try:
        step = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # noqa: BLE001 - a remote or unreadable path: name it without its step
        step = None
    return f"Weights: {ckpt_path}" + (f" (step {step})" if step is not None else "")


def tensorboard_command() -> str:
    """How to start TensorBoard from this environment, whether or not it is activated: its script's full path."""
    script = Path(sys.executable).parent / ("tensorboard.exe" if os.name == "nt" else "tensorboard")
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m tensorboard.main"


def _per_task_errors(names: list[str], accuracies, published: dict[str, float] | None) -> list[str]:
    """Error rate of each named test task (e.g. the runs of Omniglot's one-shot challenge) and their mean."""
    if len(names) != len(accuracies):  # e.g. several devices, whose gathered order is not the task order
        return [f"(per-task errors not shown: {len(accuracies)} values for {len(names)} named tasks)"]
    errors = [100 * (1 - float(a)) for a in accuracies]
    lines = [f"{name}: error {error:.1f}%" for name, error in zip(names, errors)]
    lines.append(f"Mean error over {len(errors)} runs: {sum(errors) / len(errors):.1f}%")
    if published:
        lines.append("Published: " + ", ".join(f"{who} {rate}%" for who, rate in published.items()))
    return lines


#: The commands that use a checkpoint without a Trainer: name -> (module, function of argv).
COMMANDS = {
    "adapt": (".adapt_command", "main"),  # classify your own images
    "plot-lrs": (".plotting", "main"),  # the learned rates α
    "plot-sine": (".task_plots", "main_sine"),  # adaptation on sine test tasks
    "plot-tasks": (".task_plots", "main_tasks"),  # one image test task, support, queries and predictions
}


def program() -> None:
    """The ``metasgd`` program (console script and ``python -m metasgd_lightning``): :func:`main` in a process of
    its own."""
    # torch's and Lightning's millions of objects live as long as the process: the collector skips them from here
    # on, which takes a second off the exit of every command (and off its full collections while it runs).
    gc.freeze()
    main()


def main(args: list[str] | None = None) -> None:
    """The ``metasgd`` command with ``args`` (default: ``sys.argv[1:]``), in this process; :func:`program` is the
    console script's entry point.

    A user's mistake ends in one line, ``metasgd <command>: <what is wrong>``, and exit status 1; a bug of
    ours keeps its traceback. ``METASGD_TRACEBACK=1`` shows the traceback of user errors too.
    """
    argv = sys.argv[1:] if args is None else args
    command = f"metasgd {argv[0]}" if argv[:1] and argv[0] in (*COMMANDS, *MetaSGDCLI.subcommands()) else "metasgd"
    try:
        _main(argv, args)
    except Exception as error:
        message = user_error_message(error)
        if message is None or show_tracebacks():
            raise
        raise SystemExit(f"{command}: {message}") from None


def _main(argv: list[str], args: list[str] | None) -> None:
    if argv[:1] and argv[0] in COMMANDS:  # not a Trainer command: use a checkpoint
        module_name, function = COMMANDS[argv[0]]
        run = getattr(importlib.import_module(module_name, __package__), function)
        code = run(argv[1:])
        if code:
            raise SystemExit(code)
        return None
    silence_lightning_noise()
    MetaSGDCLI(
        MetaSGDLightningModule,
        LightningDataModule,
        subclass_mode_data=True,
        # Meta-SGD adapts with gradients at validation and test too.
        trainer_defaults={"inference_mode": False},
        save_config_kwargs={"overwrite": True},
        # Whole option names only (no prefixes), unknown ones named in one line; `metasgd` in usage lines
        # also under `python -m metasgd_lightning`.
        parser_class=MetaSGDArgumentParser,
        parser_kwargs={"prog": "metasgd", "description": "Meta-SGD, MAML and Reptile with PyTorch Lightning.",
                       "epilog": "Commands on a checkpoint, each with --help: " + ", ".join(COMMANDS) + "."},
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
