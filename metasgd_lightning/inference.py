"""Use a trained meta-learner on a new task: load a checkpoint, adapt on a support set, predict.

The adapted model comes back as a plain ``nn.Module`` with the adapted weights: it runs without
Lightning or learn2learn.

Example:
    >>> from metasgd_lightning.inference import load_meta_learner, adapt   # doctest: +SKIP
    >>> module = load_meta_learner("runs/sine_5shot/checkpoints/last.ckpt")
    >>> model = adapt(module, support_x, support_y)
    >>> predictions = model(query_x)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from .module import MetaSGDLightningModule

__all__ = ["load_meta_learner", "adapt"]


def load_meta_learner(path: str | Path, map_location: str | torch.device = "cpu", trusted: bool = False) -> MetaSGDLightningModule:
    """Load a :class:`MetaSGDLightningModule` checkpoint (e.g. ``last.ckpt`` from ``metasgd fit``).

    Args:
        path: the checkpoint file.
        map_location: where to put the weights.
        trusted: allow unpickling arbitrary objects. Checkpoints written by the ``metasgd`` CLI do not
            need it; a checkpoint of a module built in Python stores its model as a pickled object and
            does (only for files you trust).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint, or not one of this module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Give the path of a .ckpt file written by `metasgd fit` "
                                "(by default under runs/<config name>/checkpoints/).")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a bad file
        hint = "" if trusted else (" If it is a checkpoint of a module built in Python (its model is pickled) and you "
                                   "trust it, pass trusted=True.")
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint: {str(error).splitlines()[0]}.{hint}") from error
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not state or not any(key.startswith("meta_learner.lrs.") for key in state):
        raise ValueError(f"{path} is not a checkpoint of MetaSGDLightningModule (it has no meta_learner.lrs.* weights).")
    module = MetaSGDLightningModule.load_from_checkpoint(path, map_location=map_location, weights_only=not trusted)
    return module.eval()


def adapt(module: MetaSGDLightningModule, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> nn.Module:
    """Adapt the meta-learned model to one task and return it as a plain ``nn.Module``.

    Args:
        module: a trained module (see :func:`load_meta_learner`).
        support_x: the task's support inputs, ``[examples, ...]`` (for images ``[examples, C, H, W]``,
            preprocessed as in training).
        support_y: their targets: class indices ``0..N-1`` (classification) or values (regression).
        steps: inner steps (default: the module's ``eval_inner_steps``).

    Returns:
        A copy of the model whose weights are the adapted θ'; it needs neither Lightning nor learn2learn.

    Raises:
        ValueError: the support set does not fit the model (number of ways, a class without examples,
            input shape).
    """
    device = next(module.parameters()).device
    support_x, support_y = support_x.to(device), support_y.to(device)
    if support_x.shape[0] != support_y.shape[0]:
        raise ValueError(f"support_x and support_y must hold the same number of examples; got {support_x.shape[0]} "
                         f"and {support_y.shape[0]}.")
    with torch.no_grad():
        outputs = module.meta_learner(support_x)  # also checks the input shape (ConvNet4 names it)
    if module.task == "classification":
        ways = outputs.shape[-1]
        if support_y.is_floating_point():
            raise ValueError(f"Classification support labels must be integer class indices; got {support_y.dtype}.")
        present = set(support_y.unique().tolist())
        if present != set(range(ways)):
            missing = sorted(set(range(ways)) - present)
            extra = sorted(present - set(range(ways)))
            raise ValueError(
                f"The model was meta-trained for {ways}-way tasks: the support set needs labels 0..{ways - 1}, each with "
                f"at least one example. Missing classes: {missing or 'none'}; labels out of range: {extra or 'none'}."
            )
    fast = module.meta_learner.adapt(support_x, support_y, module.loss_fn, steps or module.eval_inner_steps,
                                     first_order=True)
    adapted = copy.deepcopy(module.model)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            param.copy_(fast[name])
    return adapted.requires_grad_(False).eval()
