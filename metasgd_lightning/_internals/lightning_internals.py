"""lightning's private names that metasgd_lightning relies on, each behind one function (see the package docstring)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

# -- LightningCLI's hyperparameter keys -------------------------------------------------------------------------------
# A module built by LightningCLI stores, among its hyperparameters, the function that rebuilds it ("_instantiator")
# and, in subclass mode, its class ("_class_path"); `load_from_checkpoint` and LightningCLI's `--ckpt_path` read them.
# The keys are LightningCLI's private convention (lightning.pytorch.cli, core/saving.py), not a documented API.

_CLASS_PATH_KEY = "_class_path"
_INSTANTIATOR_KEY = "_instantiator"
_CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def recorded_class_path(hparams: dict, *, pop: bool = False) -> str | None:
    """The class LightningCLI recorded in a module's (or data module's) hyperparameters, or None; ``pop`` removes it."""
    return hparams.pop(_CLASS_PATH_KEY, None) if pop else hparams.get(_CLASS_PATH_KEY)


def built_by_cli(hparams: dict) -> bool:
    """Whether the hyperparameters are LightningCLI's configs (the module was instantiated by it)."""
    return _INSTANTIATOR_KEY in hparams


def mark_as_cli_config(hparams: dict) -> None:
    """Have ``load_from_checkpoint`` rebuild the ``class_path`` configs in ``hparams`` as LightningCLI's do."""
    hparams[_INSTANTIATOR_KEY] = _CLI_INSTANTIATOR


# -- LightningCLI's trainer callbacks ----------------------------------------------------------------------------------


class TrainerCallbacksFilter(LightningCLI):
    """LightningCLI whose :meth:`trainer_callbacks` may drop callbacks of ``add_lightning_class_args`` groups.

    LightningCLI hands those callbacks to the Trainer in its private ``_instantiate_trainer(config,
    callbacks)``, with no public hook to leave one out (e.g. our progress bar when the config sets
    ``enable_progress_bar: false``, which the Trainer would refuse beside a progress bar callback).
    """

    def trainer_callbacks(self, config: dict[str, Any], callbacks: list) -> list:
        """The callbacks of the ``add_lightning_class_args`` groups the Trainer gets (override; default: all)."""
        return callbacks

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list):
        return super()._instantiate_trainer(config, self.trainer_callbacks(config, callbacks))



# -- ModelCheckpoint and the training loop (used by training/callbacks.py) ---------------------------------------------
# MetaSGDCheckpoint writes last.ckpt at times of its own (every n steps or minutes, on a stop signal) through
# ModelCheckpoint's own writer, so that last.ckpt keeps ModelCheckpoint's naming, its removal of the previous file
# and its `last_model_path`; Lightning has no public "save last now" method.


def reset_checkpoint_monitor(callback, *args: Any, **kwargs: Any) -> None:
    """Set a ``ModelCheckpoint``'s ``monitor``/``mode`` after construction, by running its constructor again.

    ModelCheckpoint derives ``kth_value``, ``best_model_score``'s start and ``mode`` from them in its
    constructor (the private ``__init_monitor_mode``); there is no public setter.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    ModelCheckpoint.__init__(callback, *args, **kwargs)


def monitor_candidates(callback, trainer) -> dict:
    """The metrics a ``ModelCheckpoint`` ranks and names files by (``ModelCheckpoint._monitor_candidates``)."""
    return callback._monitor_candidates(trainer)


def save_last_checkpoint(callback, trainer) -> None:
    """Write a ``ModelCheckpoint``'s last checkpoint now (``_save_last_checkpoint``).

    ModelCheckpoint skips every later save of a step once one is made (``_last_global_step_saved``): a save of
    last.ckpt alone must not keep this step's validation from ranking its weights, so the mark is put back.
    """
    previous = callback._last_global_step_saved
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
    callback._last_global_step_saved = previous


def rank_and_save(callback, trainer, current) -> None:
    """Rank ``current`` among a ``ModelCheckpoint``'s best and save it if it is among them (``_update_best_and_save``)."""
    callback._update_best_and_save(current, trainer, callback._monitor_candidates(trainer))


def training_batch_progress(trainer):
    """The fit loop's batch progress (``ready``/``completed`` counts, ``is_last_batch``) of the current epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress


def teardown_trainer(trainer) -> None:
    """What Lightning does after ``on_exception`` (``Trainer._teardown``: workers, loggers, signal handlers).

    Needed when a callback ends the run from ``on_exception`` with an exception of its own.
    """
    trainer._teardown()
