"""``metasgd plot-lrs CKPT --out lrs.png``: the distribution of the learned rates α per layer.

Meta-SGD: one histogram of α per adapted parameter tensor. MAML: its one fixed rate α, drawn as such.
Reptile learns no inner-loop rate: the command says so in one line (:class:`NoLearnedRatesError`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..training.checkpointing import foreign_format, missing_checkpoint
from ._parser import OneLineArgumentParser

__all__ = ["NoLearnedRatesError", "plot_learned_rates", "main"]


class NoLearnedRatesError(ValueError):
    """The checkpoint holds a method without inner-loop rates (Reptile): there is nothing to draw."""


def plot_learned_rates(checkpoint_path: str | Path, out: str | Path, bins: int = 60, trusted: bool = False) -> Path:
    """Draw the inner-loop rates α of a checkpoint and save the figure to ``out``.

    Meta-SGD: one histogram of α per adapted parameter tensor, each with its share of negative entries
    (Meta-SGD learns a direction as well as a rate). MAML (a fixed α): one bar per tensor at that α,
    the title stating it is fixed.

    Args:
        checkpoint_path: a checkpoint of ``MetaSGDLightningModule`` or ``MAMLLightningModule``.
        out: the image to write.
        bins: histogram bins.
        trusted: allow unpickling arbitrary objects (a checkpoint of a module built in Python whose model
            is pickled); by default the checkpoint is read with PyTorch's safe ``weights_only`` loading,
            as :func:`metasgd_lightning.commands.inference.load_meta_learner` reads it.

    Raises:
        FileNotFoundError: no file at ``checkpoint_path``.
        ValueError: not a readable checkpoint (without ``trusted``: one that needs unpickling), or one
            without rates (:class:`NoLearnedRatesError` for a Reptile checkpoint).

    Example:
        >>> plot_learned_rates("runs/sine_5shot/checkpoints/last.ckpt", "lrs.png")  # doctest: +SKIP
        PosixPath('lrs.png')
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(checkpoint_path)
    if not path.is_file():
        raise missing_checkpoint(path)
    other = foreign_format(path)
    if other:
        raise ValueError(f"{path} is not a PyTorch checkpoint: it is {other}. Give a .ckpt file written by `metasgd fit`.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:
        hint = "" if trusted else (" If it is a checkpoint of a module built in Python (its model is pickled) and you "
                                   "trust it, pass trusted=True (--trusted on the command line).")
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint: {str(error).splitlines()[0]}.{hint}") from error
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    rates = {k.removeprefix("meta_learner.lrs.").replace("-", "."): v.float() for k, v in state.items()
             if k.startswith("meta_learner.lrs.")}
    if not rates:
        _refuse_without_rates(path, checkpoint)
    hparams = checkpoint.get("hyper_parameters")
    hparams = hparams if isinstance(hparams, dict) else {}
    # MAML (MAMLLightningModule, or MetaSGDLightningModule with learn_lr=False): one fixed scalar α everywhere.
    fixed = hparams.get("learn_lr") is False or "inner_lr" in hparams or (
        all(v.dim() == 0 for v in rates.values()) and len({float(v) for v in rates.values()}) == 1)
    if fixed:
        fig = _fixed_rate_figure(plt, path, rates)
    else:
        fig = _histograms(plt, path, rates, bins)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _refuse_without_rates(path: Path, checkpoint: object) -> None:
    """Raise the error that says why a checkpoint without ``meta_learner.lrs.*`` has no rates to draw."""
    from ..training import ReptileLightningModule
    from .inference import checkpoint_module_class  # imported here: it pulls in the data modules

    try:
        cls = checkpoint_module_class(checkpoint if isinstance(checkpoint, dict) else {}, path)
    except ValueError:
        cls = None
    if cls is not None and issubclass(cls, ReptileLightningModule):
        hparams = checkpoint.get("hyper_parameters") or {}
        inner = f"{hparams.get('inner_optimizer', 'adam')}".replace("adam", "Adam").replace("sgd", "SGD")
        raise NoLearnedRatesError(f"{path} is a Reptile checkpoint; Reptile learns no inner-loop rates (its inner "
                                  f"optimiser is {inner} with lr {hparams.get('inner_lr', 'unknown')}).")
    if cls is not None:
        raise NoLearnedRatesError(f"{path} is a checkpoint of {cls.__name__}, which learns no inner-loop rates "
                                  "(no meta_learner.lrs.* weights): there is nothing to draw.")
    raise ValueError(f"{path} holds no learned rates (meta_learner.lrs.*): give a checkpoint of Meta-SGD "
                     "(MetaSGDLightningModule) or MAML (MAMLLightningModule), written by `metasgd fit`.")


def _histograms(plt, path: Path, rates: dict, bins: int):
    """Meta-SGD: one histogram of α per adapted parameter tensor, with its mean and share of negative entries."""
    cols = min(4, len(rates))
    rows = math.ceil(len(rates) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, alpha) in zip(axes.flat, rates.items()):
        values = alpha.flatten().numpy()
        ax.hist(values, bins=bins, color="#3b75af")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{name}  {tuple(alpha.shape)}", fontsize=9)
        ax.text(0.98, 0.95, f"mean {values.mean():.3g}\nneg {100 * (values < 0).mean():.1f}%", transform=ax.transAxes,
                ha="right", va="top", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rates):]:
        ax.axis("off")
    fig.suptitle(f"Meta-SGD: learned inner-loop rates α per parameter tensor: {path.name}", fontsize=10)
    return fig


def _fixed_rate_figure(plt, path: Path, rates: dict):
    """MAML: one bar per adapted parameter tensor at the fixed α (the same for all), and α in the title."""
    names = list(rates)
    values = [float(v.flatten()[0]) for v in rates.values()]
    alpha = values[0]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), values, color="#999999")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("α", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"MAML: fixed inner-loop rate α = {alpha:g} for every parameter (not learned): {path.name}",
                 fontsize=9)
    return fig


def main(argv: list[str]) -> None:
    parser = OneLineArgumentParser(prog="metasgd plot-lrs", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by `metasgd fit`")
    parser.add_argument("--out", default="lrs.png", help="the image to write (default: lrs.png)")
    parser.add_argument("--bins", type=int, default=60)
    parser.add_argument("--trusted", action="store_true",
                        help="unpickle arbitrary objects (a checkpoint of a module built in Python; only files you trust)")
    args = parser.parse_args(argv)
    try:
        print(f"Wrote {plot_learned_rates(args.checkpoint, args.out, args.bins, trusted=args.trusted)}")
    except (FileNotFoundError, ValueError) as error:  # NoLearnedRatesError included: one line, no traceback
        raise SystemExit(f"metasgd plot-lrs: {error}") from None
