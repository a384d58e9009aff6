"""``metasgd plot-lrs CKPT --out lrs.png``: the distribution of the learned rates α per layer."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..training.checkpointing import foreign_format

__all__ = ["plot_learned_rates", "main"]


def plot_learned_rates(checkpoint_path: str | Path, out: str | Path, bins: int = 60, trusted: bool = False) -> Path:
    """Draw one histogram of α per adapted parameter tensor from a checkpoint, and save it to ``out``.

    Each panel gives the share of negative entries: Meta-SGD learns a direction as well as a rate.

    Args:
        checkpoint_path: a checkpoint of ``MetaSGDLightningModule``.
        out: the image to write.
        bins: histogram bins.
        trusted: allow unpickling arbitrary objects (a checkpoint of a module built in Python whose model
            is pickled); by default the checkpoint is read with PyTorch's safe ``weights_only`` loading,
            as :func:`metasgd_lightning.commands.inference.load_meta_learner` reads it.

    Raises:
        FileNotFoundError: no file at ``checkpoint_path``.
        ValueError: not a readable checkpoint (without ``trusted``: one that needs unpickling), or one
            without learned rates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    other = foreign_format(path)
    if other:
        raise ValueError(f"{path} is not a PyTorch checkpoint: it is {other}. Give a .ckpt file written by `metasgd fit`.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a bad file
        hint = "" if trusted else (" If it is a checkpoint of a module built in Python (its model is pickled) and you "
                                   "trust it, pass trusted=True (--trusted on the command line).")
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint: {str(error).splitlines()[0]}.{hint}") from error
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    rates = {k.removeprefix("meta_learner.lrs.").replace("-", "."): v.float() for k, v in state.items()
             if k.startswith("meta_learner.lrs.")}
    if not rates:
        raise ValueError(f"{path} holds no learned rates (meta_learner.lrs.*): is it a MetaSGDLightningModule checkpoint?")
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
    fig.suptitle(f"Learned inner-loop rates α per parameter tensor: {path.name}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="metasgd plot-lrs", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by `metasgd fit`")
    parser.add_argument("--out", default="lrs.png", help="the image to write (default: lrs.png)")
    parser.add_argument("--bins", type=int, default=60)
    parser.add_argument("--trusted", action="store_true",
                        help="unpickle arbitrary objects (a checkpoint of a module built in Python; only files you trust)")
    args = parser.parse_args(argv)
    print(f"Wrote {plot_learned_rates(args.checkpoint, args.out, args.bins, trusted=args.trusted)}")
